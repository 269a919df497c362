"""Where `ascend-llm rank-table generate` finds device IPs and the server id of this node.

Device IPs come from, in order: explicit `--device-ips`; `hccn_tool -i N -ip -g` (prints `ipaddr:<IP>`) when
the tool is on PATH; `/etc/hccn.conf` (`address_N=<IP>` lines). Every failure is a RankTableError that names
what was tried, never a raw KeyError, IndexError or socket.gaierror.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ascend_llm.cluster.rank_table import MAX_DEVICE_ID
from ascend_llm.errors import RankTableError

DEFAULT_HCCN_CONF = "/etc/hccn.conf"
HCCN_TOOL = "hccn_tool"
TOOL_TIMEOUT_S = 15


def parse_device_list(text: str, field: str = "--devices") -> list[int]:
    """`0-7`, `0,1,2,3` or `0-3,6` -> sorted unique device ids in 0..15. Raises RankTableError naming `field` for
    bad syntax, a decreasing or out-of-range range, or a repeated device."""
    ids: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise RankTableError(field, text, "allowed: device ids and ranges like 0-7, 0,1,2,3 or 0-3,6")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low or high > MAX_DEVICE_ID:
            raise RankTableError(field, text, f"ranges must be increasing and within 0..{MAX_DEVICE_ID}")
        ids.extend(range(low, high + 1))
    if len(set(ids)) != len(ids):
        raise RankTableError(field, text, "each device may appear only once")
    return sorted(ids)


def _check_ip(value: str, field: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise RankTableError(field, value, "must be an IPv4 address like 192.168.100.101") from None
    return value


def parse_device_ips(text: str, device_ids: Sequence[int], field: str = "--device-ips") -> dict[int, str]:
    """`ip0,ip1,...` (one per device, in --devices order) or `0=ip0,1=ip1,...` -> {device_id: ip}. Raises
    RankTableError naming `field` for a bad entry or IPv4 address, a wrong count or a device without an IP."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if parts and all("=" in p for p in parts):
        out = {}
        for part in parts:
            key, value = part.split("=", 1)
            if not key.isdigit():
                raise RankTableError(field, part, "entries must look like <device_id>=<IPv4>")
            out[int(key)] = _check_ip(value, f"{field} (device {key})")
        missing = [d for d in device_ids if d not in out]
        if missing:
            raise RankTableError(field, text, f"no IP given for device(s) {', '.join(map(str, missing))}")
        return {d: out[d] for d in device_ids}
    if len(parts) != len(device_ids):
        raise RankTableError(field, text, f"give one IP per device ({len(device_ids)}: "
                             f"{','.join(map(str, device_ids))}), or <device_id>=<IP> pairs")
    return {d: _check_ip(ip, f"{field} (device {d})") for d, ip in zip(device_ids, parts)}


def read_hccn_conf(path: str | os.PathLike) -> dict[int, str]:
    """`address_N=IP` lines of an hccn.conf file -> {N: IP}; other lines are ignored. Raises RankTableError when
    the file cannot be read or an address is not IPv4 (naming file:line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise RankTableError("hccn.conf", str(path), f"cannot read the file: {exc.strerror or exc}") from None
    out: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        match = re.fullmatch(r"\s*address_(\d+)\s*=\s*(\S+)\s*", line)
        if match:
            out[int(match.group(1))] = _check_ip(match.group(2), f"{path}:{number} address_{match.group(1)}")
    return out


def read_hccn_tool_ip(device_id: int, tool: str = HCCN_TOOL) -> str:
    """The IP `hccn_tool -i <device_id> -ip -g` reports (its `ipaddr:<IP>` line; 15 s timeout). Raises
    RankTableError naming the command when it cannot run, fails or prints no IPv4 address."""
    command = [tool, "-i", str(device_id), "-ip", "-g"]
    where = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RankTableError(where, None, f"could not run it: {exc}") from None
    output = (done.stdout or "") + (done.stderr or "")
    match = re.search(r"ipaddr\s*:\s*(\S+)", output)
    if done.returncode != 0 or not match:
        first = next((line.strip() for line in output.splitlines() if line.strip()), "no output")
        raise RankTableError(where, first, f"exit status {done.returncode}; expected a line 'ipaddr:<IPv4>'")
    return _check_ip(match.group(1), where)


def discover_device_ips(device_ids: Sequence[int], explicit: Optional[str] = None, tool: str = HCCN_TOOL,
                        hccn_conf: str | os.PathLike = DEFAULT_HCCN_CONF) -> tuple[dict[int, str], str]:
    """({device_id: ip}, source description) from --device-ips, hccn_tool or hccn.conf, in that order. Raises
    RankTableError listing what was tried when no source covers every device."""
    if explicit:
        return parse_device_ips(explicit, device_ids), "--device-ips"
    tried = []
    tool_path = shutil.which(tool)
    if tool_path:
        try:
            return {d: read_hccn_tool_ip(d, tool_path) for d in device_ids}, f"{tool_path}"
        except RankTableError as exc:
            tried.append(str(exc))
    else:
        tried.append(f"{tool}: not found on PATH")
    conf = Path(hccn_conf)
    if conf.is_file():
        found = read_hccn_conf(conf)
        missing = [d for d in device_ids if d not in found]
        if not missing:
            return {d: found[d] for d in device_ids}, str(conf)
        tried.append(f"{conf}: no address_N line for device(s) {', '.join(map(str, missing))}")
    else:
        tried.append(f"{conf}: no such file")
    raise RankTableError("device IPs", ",".join(map(str, device_ids)),
                         "could not find them (" + "; ".join(tried) + "); pass --device-ips ip0,ip1,... "
                         "or --hccn-conf <file>")


def resolve_server_id(explicit: Optional[str] = None) -> str:
    """The server id (this node's host IP): explicit, else the address the host name resolves to. Raises
    RankTableError for an empty/spaced value, a host name that does not resolve or resolves to loopback."""
    if explicit:
        value = explicit.strip()
        if not value or any(c.isspace() for c in value):
            raise RankTableError("--server-id", explicit, "must be this node's IP address (no spaces)")
        return value
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError as exc:  # socket.gaierror and friends
        raise RankTableError("--server-id", None, f"not given, and host name {hostname!r} does not resolve "
                             f"({exc}); pass --server-id <this node's IP>") from None
    if ipaddress.IPv4Address(address).is_loopback:
        raise RankTableError("--server-id", None, f"not given, and host name {hostname!r} resolves to the loopback "
                             f"address {address}, which other nodes cannot reach; pass --server-id <this node's IP>")
    return address
