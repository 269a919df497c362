"""The one crash-safe writer: a file or a directory appears whole, or not at all, and nothing the toolkit did
not write is ever deleted.

- `write_file_atomic`: a temporary file beside the target, fsync, rename over it, fsync of the parent.
- `write_dir_atomic`: `fill(tmp)` writes into a fresh temporary directory beside the target; every file and
  directory is chmod'ed (0644 / 0755) and fsync'ed, the directory is renamed into place and the parent fsync'ed.
  An existing non-empty target is refused unless `overwrite`; even then only a directory the toolkit wrote itself
  is replaced, and only when it holds nothing else (`foreign_files`: MARKER lists the files written), never the
  working directory or an ancestor of it, the source model, or a training run. A replaced directory is first
  renamed aside, so a crash between the two renames leaves it recoverable.
- Temporaries are named `.NAME.tmp-HOST-PID-RAND` (set-aside directories `.NAME.old-HOST-PID-RAND`), HOST being a
  hash of the host name: the next write into the same parent removes those of dead processes of this host
  (`clean_stale`) and renames back a set-aside directory whose target is missing.
- Problems of the output (read-only, full disk, quota, a file where a directory belongs) become one `OutputError`
  naming the field, the path and the cause (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ascend_llm.errors import OutputError, UserInputError

__all__ = ["MARKER", "OutputError", "check_output_dir", "clean_stale", "finish_tree", "foreign_files", "fsync_path",
           "is_plain_relative",
           "install_dir", "make_temp_dir", "output_errors", "pid_alive", "sha256_file", "temp_name",
           "write_dir_atomic", "write_file_atomic"]

logger = logging.getLogger("ascend_llm.store")

MARKER = ".ascend_llm_output.json"  # written into every directory write_dir_atomic makes (with marker=True)
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
_CAUSES = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
           errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ENOTDIR: "a parent is a file, not a directory", errno.EISDIR: "is a directory, not a file",
           errno.ENOTEMPTY: "exists and is not empty", errno.EEXIST: "exists", errno.ENAMETOOLONG: "name too long",
           errno.EFBIG: "file too large for the file system"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors reports I/O errors as "... (os error 28)"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_plain_relative(name: object) -> bool:
    """Whether `name` (read from a file: an index, state.json) is a non-empty relative path without '..' parts,
    i.e. it names a file inside the directory it is joined to."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (its entries), so that a rename after it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(name: str, kind: str = "tmp") -> str:
    """`.NAME.KIND-HOST-PID-RAND`: the name of a temporary ("tmp") or set-aside ("old") entry for `name`."""
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a zombie counts as dead; another user's process as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead processes of this host left in `parent`; rename a set-aside directory
    back when its target is missing (a crash between the two renames of a replacement), else remove it.
    Best effort: entries that cannot be removed stay. Returns the paths removed or renamed back."""
    parent, done = Path(parent), []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or match["host"] != _HOST or pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        final = parent / match["name"]
        try:
            if match["kind"] == "old" and not os.path.lexists(final):
                os.rename(path, final)
                logger.warning("recovered %s, set aside by an interrupted write", final)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        done.append(path)
    return done


def _cause(exc: BaseException) -> tuple[int | None, str]:
    code = getattr(exc, "errno", None)
    if code is None:
        match = _RUST_OS_ERROR.search(str(exc))
        code = int(match[1]) if match else None
    if code is None:
        return None, str(exc)
    text = _CAUSES.get(code) or os.strerror(code).lower()
    return code, f"{text} ({errno.errorcode.get(code, code)})"


@contextmanager
def output_errors(field: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError (or a library's "(os error N)" error) about writing `path` into one OutputError naming
    `field`, the path and the cause. An OSError about another file (e.g. an input copied along) passes through."""
    try:
        yield
    except OutputError as exc:  # from a nested writer (a file inside a directory being written): name ours
        if exc.field != field and isinstance(exc.value, str) and _about(Path(path), Path(exc.value)):
            raise OutputError(field, str(path), exc.allowed) from None
        raise
    except UserInputError:
        raise
    except OSError as exc:
        name = getattr(exc, "filename", None)
        if name is not None and not _about(Path(path), Path(os.fsdecode(name))):
            raise
        raise OutputError(field, str(path), _advice(*_cause(exc))) from None
    except Exception as exc:
        code, text = _cause(exc)
        if code is None:
            raise
        raise OutputError(field, str(path), _advice(code, text)) from None


def _about(path: Path, name: Path) -> bool:
    """Whether an error about file `name` concerns writing `path` (the path, beside it, inside it, a parent)."""
    path, name = path.absolute(), name.absolute()
    return name == path or path.parent in name.parents or name in path.parents or path in name.parents


def _advice(code: int | None, text: str) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write: {text}; free space or choose another path"
    return f"cannot write: {text}; choose a writable path"


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory `parent/.NAME.tmp-HOST-PID-RAND` (mode 0755), parents created."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = parent / temp_name(name)
        try:
            os.mkdir(tmp, 0o755)
        except FileExistsError:
            continue
        os.chmod(tmp, 0o755)  # whatever the umask: a model directory is meant to be shared
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent / name))


def finish_tree(root: Path) -> None:
    """chmod every file 0644 and directory 0755 below `root` (and root), fsync them all, the directories last."""
    for current, dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(current, name), 0o644)
            fsync_path(os.path.join(current, name))
        os.chmod(current, 0o755)
        fsync_path(current)


def install_dir(tmp: Path, final: Path, *, replace: bool) -> Path:
    """Rename the finished directory `tmp` to `final` and fsync the parent. An absent or empty `final` is
    replaced by the rename itself; a non-empty one only when `replace`: it is renamed aside first and removed
    after (a crash in between leaves it recoverable by `clean_stale`). OSError ENOTEMPTY otherwise."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not replace:
            raise
        aside = final.parent / temp_name(final.name, "old")
        os.rename(final, aside)
        os.rename(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return final
    fsync_path(final.parent)
    return final


# the toolkit's quantized layout as written before MARKER existed (config.json with "model" and "quantization")
_LEGACY_QUANTIZED = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "generation_config.json", "special_tokens_map.json"}


def _files_below(root: Path) -> list[str]:
    """Relative POSIX paths of every file (and symbolic link) below `root`, MARKER left out."""
    found = []
    for current, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(current, d))]:
            rel = Path(current, name).relative_to(root).as_posix()
            if rel != MARKER:
                found.append(rel)
    return sorted(found)


def foreign_files(path: Path) -> list[str] | None:
    """The files in directory `path` that the toolkit did not write: [] when it wrote every one (MARKER lists
    them), None when nothing says the toolkit wrote the directory (no MARKER, and not its quantized layout from
    before MARKER existed)."""
    present = _files_below(path)
    try:
        listed = set(json.loads((path / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not (isinstance(config, dict) and "model" in config and "quantization" in config):
            return None
        listed = _LEGACY_QUANTIZED
    return [name for name in present if name not in listed]


def _refuse(field: str, path: Path, why: str) -> OutputError:
    return OutputError(field, str(path), why)


def _holds_cwd(out: Path) -> bool:
    real, cwd = out.resolve(), Path.cwd().resolve()
    return real == cwd or real in cwd.parents


def _check_replaceable(out: Path, field: str, protect: Iterable[str | os.PathLike]) -> None:
    real = out.resolve()
    for source in protect:
        src = Path(source).resolve()
        if real == src or real in src.parents:
            raise _refuse(field, out, f"is or holds the source model {source}; never replaced, choose another path")
    if (out / "checkpoints").is_dir() or (out / "metrics.jsonl").exists():
        raise _refuse(field, out, "is a training run (holds checkpoints/ or metrics.jsonl); never replaced, "
                                  "choose another path")
    foreign = foreign_files(out)
    if foreign is None:
        raise _refuse(field, out, f"holds files ascend_llm did not write (no {MARKER}); --overwrite replaces "
                                  "only a directory ascend_llm wrote: remove it yourself or choose another path")
    if foreign:
        more = f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else ""
        raise _refuse(field, out, f"holds {foreign[0]}{more} that ascend_llm did not write; --overwrite never "
                                  "deletes them: move them away or choose another path")


def _check_parents(out: Path, field: str) -> None:
    for parent in out.absolute().parents:
        if parent.is_dir():
            break
        if os.path.lexists(parent):
            raise _refuse(field, out, f"its parent {parent} is a file, not a directory; choose another path")


def _probe(out: Path, field: str) -> None:
    """Create and remove a temporary directory where `out` will go: a read-only or unwritable place fails now,
    before any work. A missing parent is probed through os.access on the nearest existing ancestor."""
    parent = out.absolute().parent
    with output_errors(field, out):
        if parent.is_dir():
            tmp = parent / temp_name(out.name)
            os.mkdir(tmp)
            os.rmdir(tmp)
            return
        ancestor = next(p for p in parent.parents if p.is_dir())
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(errno.EROFS if _read_only(ancestor) else errno.EACCES, "", str(ancestor))


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def check_output_dir(out_dir: str | os.PathLike, *, field: str = "--out", overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = (), overwrite_flag: str | None = "--overwrite") -> Path:
    """Refuse, before any work, an output directory the toolkit must not or cannot write: a path that is a file
    or a symbolic link, a parent that is a file, an unwritable place, the working directory or an ancestor of
    it, or an existing non-empty directory without `overwrite`; with `overwrite`, still a `protect` path (the
    source model) or a directory holding one, a training run, a directory the toolkit did not write, or one
    holding files it did not write (`foreign_files`). overwrite_flag: the command's flag named in the refusal, None
    when it has none. Returns the path. Raises OutputError naming `field` and the path."""
    out = Path(out_dir)
    target = Path(os.path.abspath(out))  # what the rename will replace ("sub/.." is the working directory)
    if target.is_symlink():
        raise _refuse(field, out, "is a symbolic link; name the directory itself")
    if os.path.lexists(target) and not target.is_dir():
        raise _refuse(field, out, "is a file, not a directory; choose another path")
    _check_parents(target, field)
    if target.is_dir() and _holds_cwd(target):  # even empty: a rename over it leaves the shell in a deleted dir
        raise _refuse(field, out, "is the working directory or holds it; choose a new directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            hint = f"pass {overwrite_flag} to replace a directory ascend_llm wrote, or " if overwrite_flag else ""
            raise _refuse(field, out, f"exists and is not empty; {hint}choose another path")
        _check_replaceable(target, field, protect)
    _probe(target, field)
    return out


def write_dir_atomic(out_dir: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False,
                     field: str = "--out", protect: Iterable[str | os.PathLike] = (), keep_existing: bool = False,
                     marker: bool = True, overwrite_flag: str = "--overwrite") -> Path:
    """Write a directory whole or not at all: `fill(tmp)` writes files into a fresh temporary directory beside
    `out_dir`; then MARKER is added (unless `marker=False`), every file and directory chmod'ed 0644/0755 and
    fsync'ed, the directory renamed into place and the parent fsync'ed. Stale temporaries of dead processes in
    the parent are removed first. The target is checked as in `check_output_dir` (refused when not empty unless
    `overwrite`, and only a directory the toolkit wrote is replaced). `keep_existing`: a cache that another
    process may fill at the same time: when the target is (or becomes) non-empty, it is kept and our copy dropped.
    Returns the path. Raises OutputError naming `field` for output problems (nothing left behind); whatever
    `fill` raises otherwise passes through, the temporary removed."""
    out = Path(out_dir)
    target = Path(os.path.abspath(out))  # "q/..", "." and trailing slashes name the directory itself
    if keep_existing and target.is_dir() and any(target.iterdir()):
        return out
    protect = list(protect)
    check_output_dir(out, field=field, overwrite=overwrite, protect=protect, overwrite_flag=overwrite_flag)
    with output_errors(field, out):
        clean_stale(target.parent)
        tmp = make_temp_dir(target.parent, target.name)
        try:
            fill(tmp)
            if marker:  # what --overwrite may replace later: this directory, these files and nothing else
                (tmp / MARKER).write_text(json.dumps({"written_by": "ascend_llm", "field": field,
                                                      "files": _files_below(tmp)}, indent=1) + "\n")
            finish_tree(tmp)
            if target.is_dir() and any(target.iterdir()):  # appeared while we wrote
                if keep_existing:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return out
                check_output_dir(out, field=field, overwrite=overwrite, protect=protect,
                                 overwrite_flag=overwrite_flag)
            install_dir(tmp, target, replace=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def write_file_atomic(path: str | os.PathLike, data: bytes | str | Iterable[bytes], *, mode: int = 0o644,
                      field: str = "output") -> Path:
    """Write `data` (str as UTF-8; an iterable of byte chunks is written in order, never joined in memory) to
    `path` so a crash leaves the old file or the new one, never a torn one: a temporary file beside it, fsync,
    rename over `path`, fsync of the parent. Creates missing parents; removes stale temporaries of dead processes
    beside it. Returns the path. Raises OutputError naming `field` and the path when it cannot be written (nothing
    left behind); UnicodeEncodeError for text that is not encodable."""
    path = Path(path)
    if isinstance(data, str):
        chunks: Iterable[bytes] = [data.encode("utf-8")]
    elif isinstance(data, (bytes, bytearray, memoryview)):
        chunks = [bytes(data)]
    else:
        chunks = data
    with output_errors(field, path):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        _check_parents(path, field)
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        tmp = path.parent / temp_name(path.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_path(path.parent)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()
    return path
