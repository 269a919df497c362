"""HCCL rank tables: parse and validate (versions 1.0 and 1.2), generate, merge, show, write.

A rank table is the JSON file HCCL builds its communicators from. Every value in it is a JSON string:

    {"version": "1.0", "server_count": "1", "status": "completed",
     "server_list": [{"server_id": "10.0.0.1", "host_ip": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}, ...]}]}

Version 1.2 (Atlas A3 super pods) adds `device[].super_device_id` and a top-level
`super_pod_list: [{"super_pod_id": "0", "server_list": [{"server_id": "..."}]}]`. `hccl_configs/README.md`
documents each field. Fields without a rule here (e.g. `container_ip`, `host_nic_ip`) are accepted and
dropped when the table is rewritten by `generate`/`merge`. Every validation error is a RankTableError
naming the JSON path (e.g. `server_list[1].device[3].rank_id`), the value and the rule.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ascend_llm.errors import RankTableError
from ascend_llm.store.files import write_file_atomic

VERSIONS = ("1.0", "1.2")
MAX_DEVICE_ID = 15
MAX_PORT = 65535


@dataclass(frozen=True)
class Device:
    """One device entry: device_id 0..15 on its server, global rank_id, device_ip (IPv4; required with more than
    one server), super_device_id (version 1.2 only) and device_port (1..65535), all optional fields None."""

    device_id: int
    rank_id: int
    device_ip: Optional[str] = None
    super_device_id: Optional[int] = None
    device_port: Optional[int] = None


@dataclass(frozen=True)
class Server:
    """One server_list entry: server_id (usually the host IP), its devices and optional host_ip."""

    server_id: str
    devices: tuple[Device, ...]
    host_ip: Optional[str] = None


@dataclass(frozen=True)
class SuperPod:
    """One super_pod_list entry (version 1.2): super_pod_id and the server_ids it holds."""

    super_pod_id: str
    server_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankTable:
    """A validated rank table (see `parse_rank_table`); `to_json()` gives the file form back."""

    version: str
    servers: tuple[Server, ...]
    super_pods: tuple[SuperPod, ...] = ()

    @property
    def num_servers(self) -> int:
        """Number of servers (server_count)."""
        return len(self.servers)

    @property
    def world_size(self) -> int:
        """Number of devices over all servers: one rank each."""
        return sum(len(s.devices) for s in self.servers)

    def to_json(self) -> dict:
        """The file form: every value a string, keys in HCCL's usual order."""
        servers = []
        for server in self.servers:
            entry: dict[str, Any] = {"server_id": server.server_id}
            if server.host_ip is not None:
                entry["host_ip"] = server.host_ip
            devices = []
            for d in server.devices:
                dev: dict[str, str] = {"device_id": str(d.device_id)}
                if d.device_ip is not None:
                    dev["device_ip"] = d.device_ip
                if d.super_device_id is not None:
                    dev["super_device_id"] = str(d.super_device_id)
                if d.device_port is not None:
                    dev["device_port"] = str(d.device_port)
                dev["rank_id"] = str(d.rank_id)
                devices.append(dev)
            entry["device"] = devices
            servers.append(entry)
        out: dict[str, Any] = {"version": self.version, "server_count": str(len(self.servers)),
                               "server_list": servers}
        if self.super_pods:
            out["super_pod_list"] = [{"super_pod_id": p.super_pod_id,
                                      "server_list": [{"server_id": s} for s in p.server_ids]}
                                     for p in self.super_pods]
        out["status"] = "completed"
        return out


def _fail(path: str, value: object, rule: str) -> RankTableError:
    return RankTableError(path, value, rule)


def _get(obj: dict, key: str, path: str, required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise _fail(f"{path}.{key}" if path else key, None, "required field is missing")
        return None
    return obj[key]


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, value, f"must be a JSON string (rank tables quote every value), got {type(value).__name__}")
    return value


def _int_string(value: object, path: str, low: int = 0, high: Optional[int] = None) -> int:
    text = _string(value, path)
    if not text.isdigit() or not text.isascii():
        raise _fail(path, value, "must be a non-negative integer written as a string, e.g. \"0\"")
    number = int(text)
    if number < low or (high is not None and number > high):
        raise _fail(path, value, f"must be in {low}..{high}" if high is not None else f"must be >= {low}")
    return number


def _ipv4(value: object, path: str) -> str:
    text = _string(value, path)
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise _fail(path, value, "must be an IPv4 address like 192.168.100.101") from None
    return text


def _list(value: object, path: str) -> list:
    if not isinstance(value, list) or not value:
        raise _fail(path, value if not isinstance(value, list) else [], "must be a non-empty JSON list")
    return value


def _object(value: object, path: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, value, "must be a JSON object")
    return value


def parse_rank_table(data: object) -> RankTable:
    """Validate a decoded rank table and return it typed; raises RankTableError naming the JSON path."""
    top = _object(data, "(top level)")
    version = _string(_get(top, "version", ""), "version")
    if version not in VERSIONS:
        raise _fail("version", version, "allowed: " + ", ".join(VERSIONS))
    status = _string(_get(top, "status", ""), "status")
    if status != "completed":
        raise _fail("status", status, "must be \"completed\" (the table is still being filled in otherwise)")
    server_list = _list(_get(top, "server_list", ""), "server_list")
    server_count = _int_string(_get(top, "server_count", ""), "server_count", low=1)
    if server_count != len(server_list):
        raise _fail("server_count", str(server_count), f"must equal the length of server_list ({len(server_list)})")
    multi = len(server_list) > 1
    v12 = version == "1.2"
    servers: list[Server] = []
    seen_servers: dict[str, str] = {}
    seen_ips: dict[str, str] = {}
    seen_ranks: dict[int, str] = {}
    for i, raw_server in enumerate(server_list):
        sp = f"server_list[{i}]"
        server = _object(raw_server, sp)
        server_id = _string(_get(server, "server_id", sp), f"{sp}.server_id")
        if not server_id.strip():
            raise _fail(f"{sp}.server_id", server_id, "must not be empty")
        if server_id in seen_servers:
            raise _fail(f"{sp}.server_id", server_id, f"duplicate server id (also {seen_servers[server_id]})")
        seen_servers[server_id] = f"{sp}.server_id"
        host_ip = server.get("host_ip")
        if host_ip is not None:
            host_ip = _ipv4(host_ip, f"{sp}.host_ip")
        devices = []
        seen_dev_ids: dict[int, str] = {}
        for k, raw_device in enumerate(_list(_get(server, "device", sp), f"{sp}.device")):
            dp = f"{sp}.device[{k}]"
            device = _object(raw_device, dp)
            device_id = _int_string(_get(device, "device_id", dp), f"{dp}.device_id", 0, MAX_DEVICE_ID)
            if device_id in seen_dev_ids:
                raise _fail(f"{dp}.device_id", str(device_id),
                            f"duplicate device id within server {server_id!r} (also {seen_dev_ids[device_id]})")
            seen_dev_ids[device_id] = f"{dp}.device_id"
            device_ip = device.get("device_ip")
            if device_ip is None and multi:
                raise _fail(f"{dp}.device_ip", None, "required when the table has more than one server")
            if device_ip is not None:
                device_ip = _ipv4(device_ip, f"{dp}.device_ip")
                if device_ip in seen_ips:
                    raise _fail(f"{dp}.device_ip", device_ip, f"duplicate device IP (also {seen_ips[device_ip]})")
                seen_ips[device_ip] = f"{dp}.device_ip"
            rank_id = _int_string(_get(device, "rank_id", dp), f"{dp}.rank_id")
            if rank_id in seen_ranks:
                raise _fail(f"{dp}.rank_id", str(rank_id), f"duplicate rank id (also {seen_ranks[rank_id]})")
            seen_ranks[rank_id] = f"{dp}.rank_id"
            super_device_id = device.get("super_device_id")
            if super_device_id is not None and not v12:
                raise _fail(f"{dp}.super_device_id", super_device_id, "only allowed in version 1.2 tables")
            if super_device_id is None and v12:
                raise _fail(f"{dp}.super_device_id", None, "required in version 1.2 tables")
            if super_device_id is not None:
                super_device_id = _int_string(super_device_id, f"{dp}.super_device_id")
            port = device.get("device_port")
            if port is not None:
                port = _int_string(port, f"{dp}.device_port", 1, MAX_PORT)
            devices.append(Device(device_id, rank_id, device_ip, super_device_id, port))
        servers.append(Server(server_id, tuple(devices), host_ip))
    world = len(seen_ranks)
    for rank_id, path in seen_ranks.items():
        if rank_id >= world:
            missing = sorted(set(range(world)) - set(seen_ranks))
            raise _fail(path, str(rank_id), f"rank ids must be exactly 0..{world - 1} (the table has {world} devices); "
                        f"missing {', '.join(map(str, missing))}")
    super_pods = _parse_super_pods(top, version, servers)
    return RankTable(version, tuple(servers), super_pods)


def _parse_super_pods(top: dict, version: str, servers: list[Server]) -> tuple[SuperPod, ...]:
    if "super_pod_list" not in top:
        return ()
    if version != "1.2":
        raise _fail("super_pod_list", "[...]", "only allowed in version 1.2 tables")
    known = {s.server_id: i for i, s in enumerate(servers)}
    member_of: dict[str, str] = {}
    pods = []
    seen_pods: dict[str, str] = {}
    for p, raw_pod in enumerate(_list(top["super_pod_list"], "super_pod_list")):
        pp = f"super_pod_list[{p}]"
        pod = _object(raw_pod, pp)
        pod_id = _string(_get(pod, "super_pod_id", pp), f"{pp}.super_pod_id")
        if pod_id in seen_pods:
            raise _fail(f"{pp}.super_pod_id", pod_id, f"duplicate super pod id (also {seen_pods[pod_id]})")
        seen_pods[pod_id] = f"{pp}.super_pod_id"
        ids = []
        for s, raw_member in enumerate(_list(_get(pod, "server_list", pp), f"{pp}.server_list")):
            mp = f"{pp}.server_list[{s}].server_id"
            member = _object(raw_member, f"{pp}.server_list[{s}]")
            server_id = _string(_get(member, "server_id", f"{pp}.server_list[{s}]"), mp)
            if server_id not in known:
                raise _fail(mp, server_id, "must name a server_id of server_list")
            if server_id in member_of:
                raise _fail(mp, server_id, f"server is already in {member_of[server_id]} (one super pod per server)")
            member_of[server_id] = pp
            ids.append(server_id)
        pods.append(SuperPod(pod_id, tuple(ids)))
    for server_id, index in known.items():
        if server_id not in member_of:
            raise _fail(f"server_list[{index}].server_id", server_id,
                        "must belong to one super pod of super_pod_list when super_pod_list is given")
    # super_device_id identifies a device inside its super pod: unique there.
    for pod, raw in zip(pods, top["super_pod_list"]):
        seen: dict[int, str] = {}
        for server_id in pod.server_ids:
            index = known[server_id]
            for k, device in enumerate(servers[index].devices):
                path = f"server_list[{index}].device[{k}].super_device_id"
                if device.super_device_id in seen:
                    raise _fail(path, str(device.super_device_id), f"duplicate super_device_id within super pod "
                                f"{pod.super_pod_id!r} (also {seen[device.super_device_id]})")
                seen[device.super_device_id] = path
    return tuple(pods)


def resolve_rank_table_path(path: str | os.PathLike, field: str = "rank table") -> Path:
    """The table's absolute path: as given (relative to the working directory), else relative to the repository.
    Raises RankTableError naming `field` when neither is a file."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, Path(__file__).resolve().parents[2] / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise RankTableError(field, str(path), "file not found (looked in " + ", ".join(map(str, candidates)) + ")")


def load_rank_table(path: str | os.PathLike) -> RankTable:
    """Read and validate a rank table file. Raises RankTableError naming the file (unreadable, or not JSON: with
    line:column) or the JSON path and the file (a rule broken)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RankTableError(str(path), None, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RankTableError(f"{path}:{exc.lineno}:{exc.colno}", None, f"not valid JSON: {exc.msg}") from None
    try:
        return parse_rank_table(data)
    except RankTableError as exc:
        raise RankTableError(exc.field, exc.value, f"{exc.allowed} (in {path})") from None


def write_rank_table(table: RankTable, path: str | os.PathLike) -> Path:
    """Validate, then write atomically (temp file, fsync, rename); returns the path. Raises RankTableError for an
    invalid table, OutputError when the path cannot be written."""
    data = table.to_json()
    parse_rank_table(data)
    return write_file_atomic(path, json.dumps(data, indent=4) + "\n")


def build_single_server_table(server_id: str, device_ips: dict[int, str], device_ids: Sequence[int],
                              host_ip: Optional[str] = None, version: str = "1.0",
                              super_device_ids: Optional[dict[int, int]] = None) -> RankTable:
    """A one-server table with ranks 0..n-1 in the order of `device_ids`; validated. Raises RankTableError when a
    device has no IP in `device_ips` or the table breaks a rule."""
    devices = []
    for rank, device_id in enumerate(device_ids):
        if device_id not in device_ips:
            raise RankTableError(f"device {device_id}", None, "no device IP found for it")
        super_id = None if super_device_ids is None else super_device_ids.get(device_id)
        devices.append(Device(device_id, rank, device_ips[device_id], super_id))
    table = RankTable(version, (Server(server_id, tuple(devices), host_ip),))
    return parse_rank_table(table.to_json())


def merge_rank_tables(tables: Sequence[RankTable], names: Optional[Sequence[str]] = None) -> RankTable:
    """Concatenate single- or multi-node tables in the given order, renumbering ranks 0..N-1 server by server.

    Rejects mixed versions, duplicate server ids and duplicate device IPs (naming `tables[i]...`).
    """
    if not tables:
        raise RankTableError("tables", [], "give at least one rank table to merge")
    names = list(names) if names is not None else [f"tables[{i}]" for i in range(len(tables))]
    version = tables[0].version
    servers: list[Server] = []
    pods: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    ip_owner: dict[str, str] = {}
    rank = 0
    for t, table in enumerate(tables):
        if table.version != version:
            raise RankTableError(f"{names[t]}: version", table.version,
                                 f"all merged tables must have the same version ({names[0]} has {version})")
        for i, server in enumerate(table.servers):
            where = f"{names[t]}: server_list[{i}]"
            if server.server_id in owner:
                raise RankTableError(f"{where}.server_id", server.server_id,
                                     f"duplicate server (also in {owner[server.server_id]})")
            owner[server.server_id] = where
            devices = []
            for k, device in enumerate(sorted(server.devices, key=lambda d: d.rank_id)):
                if device.device_ip is not None:
                    if device.device_ip in ip_owner:
                        raise RankTableError(f"{where}.device[{k}].device_ip", device.device_ip,
                                             f"duplicate device IP (also {ip_owner[device.device_ip]})")
                    ip_owner[device.device_ip] = f"{where}.device[{k}]"
                devices.append(Device(device.device_id, rank, device.device_ip, device.super_device_id,
                                      device.device_port))
                rank += 1
            servers.append(Server(server.server_id, tuple(devices), server.host_ip))
        for pod in table.super_pods:
            pods.setdefault(pod.super_pod_id, []).extend(pod.server_ids)
    merged = RankTable(version, tuple(servers), tuple(SuperPod(k, tuple(v)) for k, v in pods.items()))
    return parse_rank_table(merged.to_json())


def format_rank_table(table: RankTable, source: str = "") -> str:
    """A human summary for `ascend-llm rank-table show`."""
    head = f"{source}: " if source else ""
    lines = [f"{head}version {table.version}, {table.num_servers} server(s), {table.world_size} rank(s)"]
    pod_of = {sid: p.super_pod_id for p in table.super_pods for sid in p.server_ids}
    for i, server in enumerate(table.servers):
        extra = f" host_ip={server.host_ip}" if server.host_ip else ""
        if server.server_id in pod_of:
            extra += f" super_pod={pod_of[server.server_id]}"
        ranks = [d.rank_id for d in server.devices]
        lines.append(f"  server_list[{i}] {server.server_id}{extra}: {len(server.devices)} device(s), "
                     f"ranks {min(ranks)}..{max(ranks)}")
        header = f"    {'rank':>4}  {'device':>6}  {'device_ip':<15}"
        lines.append(header + ("  super_device_id" if table.version == "1.2" else ""))
        for d in sorted(server.devices, key=lambda d: d.rank_id):
            row = f"    {d.rank_id:>4}  {d.device_id:>6}  {d.device_ip or '-':<15}"
            if table.version == "1.2":
                row += f"  {d.super_device_id}"
            lines.append(row)
    return "\n".join(line.rstrip() for line in lines)
