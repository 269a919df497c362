"""Rank tables: the examples validate, each rule rejects a broken table at the right JSON path, and
generate / merge round-trip through validate. hccn_tool is faked with executables on PATH."""

from __future__ import annotations

import copy
import json
import socket
import stat
from pathlib import Path

import pytest

from ascend_llm.cli.main import main as cli
from ascend_llm.cluster import hccn
from ascend_llm.cluster.rank_table import (
    format_rank_table,
    load_rank_table,
    merge_rank_tables,
    parse_rank_table,
    write_rank_table,
)
from ascend_llm.errors import RankTableError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "hccl_configs").glob("*.json"))


def example(name: str) -> dict:
    return json.loads((REPO / "hccl_configs" / name).read_text())


def test_every_example_validates():
    assert {p.name for p in EXAMPLES} >= {"hccl_910b_1x8.json", "hccl_910b_2x8.json", "hccl_a3_superpod_v1.2.json"}
    sizes = {p.name: (t.version, t.num_servers, t.world_size) for p in EXAMPLES for t in [load_rank_table(p)]}
    assert sizes["hccl_910b_1x8.json"] == ("1.0", 1, 8)
    assert sizes["hccl_910b_2x8.json"] == ("1.0", 2, 16)
    assert sizes["hccl_a3_superpod_v1.2.json"] == ("1.2", 2, 32)


def _set(data: dict, path: list, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


DELETE = object()
A2 = "hccl_910b_2x8.json"
A3 = "hccl_a3_superpod_v1.2.json"
SL = "server_list"

# (case, example, edit path, new value, expected JSON path in the error, words of the rule)
BROKEN = [
    ("unknown version", A2, ["version"], "2.0", "version", "allowed"),
    ("status not completed", A2, ["status"], "initializing", "status", "completed"),
    ("server_count mismatch", A2, ["server_count"], "3", "server_count", "length of server_list"),
    ("server_count not a string", A2, ["server_count"], 2, "server_count", "JSON string"),
    ("missing server_list", A2, [SL], DELETE, "server_list", "missing"),
    ("duplicate server id", A2, [SL, 1, "server_id"], "10.0.0.1", "server_list[1].server_id", "duplicate server"),
    ("duplicate rank id", A2, [SL, 1, "device", 3, "rank_id"], "2", "server_list[1].device[3].rank_id", "duplicate"),
    ("rank ids not 0..N-1", A2, [SL, 1, "device", 7, "rank_id"], "16", "server_list[1].device[7].rank_id",
     "exactly 0..15"),
    ("rank id not a number", A2, [SL, 0, "device", 0, "rank_id"], "zero", "server_list[0].device[0].rank_id",
     "integer"),
    ("missing rank id", A2, [SL, 0, "device", 2, "rank_id"], DELETE, "server_list[0].device[2].rank_id", "missing"),
    ("duplicate device id", A2, [SL, 0, "device", 1, "device_id"], "0", "server_list[0].device[1].device_id",
     "duplicate device id"),
    ("device id out of range", A2, [SL, 0, "device", 1, "device_id"], "16", "server_list[0].device[1].device_id",
     "0..15"),
    ("device ip not IPv4", A2, [SL, 1, "device", 2, "device_ip"], "192.168.1", "server_list[1].device[2].device_ip",
     "IPv4"),
    ("duplicate device ip", A2, [SL, 1, "device", 0, "device_ip"], "192.168.100.101",
     "server_list[1].device[0].device_ip", "duplicate device IP"),
    ("device ip missing on multi-server", A2, [SL, 1, "device", 0, "device_ip"], DELETE,
     "server_list[1].device[0].device_ip", "more than one server"),
    ("host ip not IPv4", A2, [SL, 0, "host_ip"], "host-a", "server_list[0].host_ip", "IPv4"),
    ("empty device list", A2, [SL, 0, "device"], [], "server_list[0].device", "non-empty"),
    ("super_device_id in 1.0", A2, [SL, 0, "device", 0, "super_device_id"], "1",
     "server_list[0].device[0].super_device_id", "only allowed in version 1.2"),
    ("super_device_id missing in 1.2", A3, [SL, 1, "device", 4, "super_device_id"], DELETE,
     "server_list[1].device[4].super_device_id", "required in version 1.2"),
    ("duplicate super_device_id in a pod", A3, [SL, 1, "device", 0, "super_device_id"], "37748736",
     "server_list[1].device[0].super_device_id", "duplicate super_device_id"),
    ("super pod names unknown server", A3, ["super_pod_list", 0, SL, 1, "server_id"], "10.9.9.9",
     "super_pod_list[0].server_list[1].server_id", "must name a server_id"),
    ("server in no super pod", A3, ["super_pod_list", 0, SL], [{"server_id": "10.0.1.1"}],
     "server_list[1].server_id", "must belong to one super pod"),
    ("duplicate super pod id", A3, ["super_pod_list"], [{"super_pod_id": "0", SL: [{"server_id": "10.0.1.1"}]},
                                                        {"super_pod_id": "0", SL: [{"server_id": "10.0.1.2"}]}],
     "super_pod_list[1].super_pod_id", "duplicate super pod"),
    ("server in two super pods", A3, ["super_pod_list"], [{"super_pod_id": "0", SL: [{"server_id": "10.0.1.1"}]},
                                                          {"super_pod_id": "1", SL: [{"server_id": "10.0.1.1"}]}],
     "super_pod_list[1].server_list[0].server_id", "already in"),
]


@pytest.mark.parametrize("case,name,path,value,json_path,rule", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_table_is_rejected_at_its_json_path(case, name, path, value, json_path, rule):
    with pytest.raises(RankTableError) as info:
        parse_rank_table(_set(example(name), path, value))
    assert info.value.field == json_path, str(info.value)
    assert rule in str(info.value)


def test_super_pod_list_in_1_0_is_rejected():
    data = example(A2)
    data["super_pod_list"] = [{"super_pod_id": "0", SL: [{"server_id": "10.0.0.1"}]}]
    with pytest.raises(RankTableError, match="only allowed in version 1.2") as info:
        parse_rank_table(data)
    assert info.value.field == "super_pod_list"


def test_validate_cli_exits_2_with_one_line_naming_path_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(example(A2), [SL, 1, "device", 3, "rank_id"], "2")))
    assert cli(["rank-table", "validate", str(REPO / "hccl_configs" / A2), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "OK" in out and A2 in out
    assert err.count("\n") == 1 and err.startswith("rank table error: server_list[1].device[3].rank_id='2'")
    assert str(bad) in err


def test_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0",\n "server_count": }')
    with pytest.raises(RankTableError, match="not valid JSON") as info:
        load_rank_table(bad)
    assert info.value.field.startswith(f"{bad}:2:")


# ---- generate ---------------------------------------------------------------------------------------------------

def fake_tool(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / "hccn_tool"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return tool


WORKING_TOOL = 'echo "ipaddr:192.168.10$2.11"\necho "netmask:255.255.255.0"\n'  # $2 is N in `-i N -ip -g`
HCCN_CONF = "".join(f"address_{d}=192.168.20{d}.12\nnetmask_{d}=255.255.255.0\nnetdetect_{d}=192.168.20{d}.1\n"
                    for d in range(8))


def test_generate_from_fake_hccn_tool_round_trips(tmp_path, monkeypatch, capsys):
    fake_tool(tmp_path / "bin", WORKING_TOOL)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = tmp_path / "node0.json"
    assert cli(["rank-table", "generate", "--devices", "0-3", "--server-id", "10.0.0.1", "-o", str(out),
                "--hccn-conf", str(tmp_path / "absent.conf")]) == 0
    table = load_rank_table(out)
    assert [(d.device_id, d.device_ip, d.rank_id) for d in table.servers[0].devices] == [
        (d, f"192.168.10{d}.11", d) for d in range(4)]
    assert "hccn_tool" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_generate_falls_back_to_hccn_conf_when_the_tool_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN_CONF)
    ips, source = hccn.discover_device_ips([4, 5, 6, 7], hccn_conf=conf)
    assert ips == {d: f"192.168.20{d}.12" for d in (4, 5, 6, 7)} and source == str(conf)


def test_generate_falls_back_to_hccn_conf_when_the_tool_fails(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", 'echo "Error: device not found" >&2\nexit 255\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN_CONF)
    ips, _ = hccn.discover_device_ips([0, 1], hccn_conf=conf)
    assert ips == {0: "192.168.200.12", 1: "192.168.201.12"}


def test_generate_with_no_source_says_what_was_tried(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", 'echo "garbage"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.200.12\n")
    with pytest.raises(RankTableError) as info:
        hccn.discover_device_ips([0, 1], hccn_conf=conf)
    message = str(info.value)
    assert "ipaddr" in message and "no address_N line for device(s) 1" in message and "--device-ips" in message


def test_generate_with_explicit_device_ips(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "t.json"
    assert cli(["rank-table", "generate", "--devices", "0,2", "--server-id", "10.0.0.5",
                "--device-ips", "192.168.1.10,192.168.1.12", "-o", str(out)]) == 0
    table = load_rank_table(out)
    assert [(d.device_id, d.device_ip, d.rank_id) for d in table.servers[0].devices] == [
        (0, "192.168.1.10", 0), (2, "192.168.1.12", 1)]
    with pytest.raises(RankTableError, match="one IP per device"):
        hccn.parse_device_ips("192.168.1.10", [0, 2])
    with pytest.raises(RankTableError, match="IPv4"):
        hccn.parse_device_ips("0=192.168.1.10,2=not-an-ip", [0, 2])


def test_server_id_resolution_never_leaks_gaierror(monkeypatch):
    def broken(_name):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", broken)
    with pytest.raises(RankTableError, match="--server-id") as info:
        hccn.resolve_server_id(None)
    assert info.value.field == "--server-id"
    monkeypatch.setattr(socket, "gethostbyname", lambda _name: "127.0.1.1")
    with pytest.raises(RankTableError, match="loopback"):
        hccn.resolve_server_id(None)
    assert hccn.resolve_server_id(" 10.1.2.3 ") == "10.1.2.3"


@pytest.mark.parametrize("text,ids", [("0-7", list(range(8))), ("0,2,4", [0, 2, 4]), ("0-1,6", [0, 1, 6])])
def test_device_list(text, ids):
    assert hccn.parse_device_list(text) == ids


@pytest.mark.parametrize("text", ["0-16", "3-1", "a", "0,0"])
def test_bad_device_list(text):
    with pytest.raises(RankTableError, match="--devices"):
        hccn.parse_device_list(text)


# ---- merge and show ---------------------------------------------------------------------------------------------

def _node_table(tmp_path: Path, server: str, third_octet: int, monkeypatch) -> Path:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / f"{server}.json"
    ips = ",".join(f"192.168.{100 + d}.{third_octet}" for d in range(8))
    assert cli(["rank-table", "generate", "--server-id", server, "--device-ips", ips, "-o", str(out)]) == 0
    return out


def test_merge_renumbers_in_node_order_and_round_trips(tmp_path, monkeypatch, capsys):
    a = _node_table(tmp_path, "10.0.0.2", 2, monkeypatch)
    b = _node_table(tmp_path, "10.0.0.1", 1, monkeypatch)
    out = tmp_path / "merged.json"
    assert cli(["rank-table", "merge", str(a), str(b), "-o", str(out)]) == 0
    merged = load_rank_table(out)
    assert [s.server_id for s in merged.servers] == ["10.0.0.2", "10.0.0.1"]
    assert [d.rank_id for s in merged.servers for d in s.devices] == list(range(16))
    assert cli(["rank-table", "validate", str(out)]) == 0
    assert cli(["rank-table", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "2 server(s), 16 rank(s)" in shown and "ranks 8..15" in shown


def test_merge_rejects_duplicate_servers_and_ips(tmp_path, monkeypatch, capsys):
    a = _node_table(tmp_path, "10.0.0.1", 1, monkeypatch)
    assert cli(["rank-table", "merge", str(a), str(a), "-o", str(tmp_path / "m.json")]) == 2
    assert "server_list[0].server_id='10.0.0.1': duplicate server" in capsys.readouterr().err
    clash = tmp_path / "clash.json"
    data = json.loads(a.read_text())
    data["server_list"][0]["server_id"] = "10.0.0.9"
    clash.write_text(json.dumps(data))
    with pytest.raises(RankTableError, match="duplicate device IP") as info:
        merge_rank_tables([load_rank_table(a), load_rank_table(clash)], names=["a", "clash"])
    assert info.value.field == "clash: server_list[0].device[0].device_ip"
    assert not (tmp_path / "m.json").exists()


def test_merge_rejects_mixed_versions():
    with pytest.raises(RankTableError, match="same version"):
        merge_rank_tables([parse_rank_table(example(A2)), parse_rank_table(example(A3))])


def test_merge_keeps_super_pods(tmp_path):
    data = example(A3)
    first = copy.deepcopy(data)
    first.update(server_count="1", server_list=copy.deepcopy(data[SL][:1]), super_pod_list=[{"super_pod_id": "0",
                                                                              SL: [{"server_id": "10.0.1.1"}]}])
    second = copy.deepcopy(data)
    second.update(server_count="1", server_list=copy.deepcopy(data[SL][1:]), super_pod_list=[{"super_pod_id": "0",
                                                                               SL: [{"server_id": "10.0.1.2"}]}])
    for d in second[SL][0]["device"]:
        d["rank_id"] = str(int(d["rank_id"]) - 16)
    merged = merge_rank_tables([parse_rank_table(first), parse_rank_table(second)])
    assert merged.to_json() == parse_rank_table(data).to_json()
    assert "super_pod=0" in format_rank_table(merged)


def test_write_is_atomic_and_validates_first(tmp_path):
    table = parse_rank_table(example(A2))
    out = write_rank_table(table, tmp_path / "sub" / "t.json")
    assert load_rank_table(out) == table
    assert [p.name for p in out.parent.iterdir()] == ["t.json"]
