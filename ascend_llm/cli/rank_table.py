"""`ascend-llm rank-table {generate,validate,merge,show}`: HCCL rank tables for Ascend jobs.

  generate  this node's table from hccn_tool, /etc/hccn.conf or --device-ips
  validate  check tables against every rule (exit 2 with the JSON path of the first problem)
  merge     several single-node tables -> one multi-node table, ranks renumbered in the given order
  show      print a table's servers, devices and ranks
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ascend_llm.cluster.hccn import (
    DEFAULT_HCCN_CONF,
    HCCN_TOOL,
    discover_device_ips,
    parse_device_list,
    resolve_server_id,
)
from ascend_llm.cluster.rank_table import (
    build_single_server_table,
    format_rank_table,
    load_rank_table,
    merge_rank_tables,
    write_rank_table,
)

EXAMPLES = """examples:
  ascend-llm rank-table generate --devices 0-7 --server-id 10.0.0.1 -o hccl_node0.json
  ascend-llm rank-table generate --devices 0-3 --server-id 10.0.0.1 --device-ips 192.168.100.101,...
  ascend-llm rank-table merge hccl_node0.json hccl_node1.json -o hccl_2x8.json
  ascend-llm rank-table validate hccl_configs/*.json
  ascend-llm rank-table show hccl_2x8.json"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm rank-table", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    gen = sub.add_parser("generate", help="write this node's rank table")
    gen.add_argument("--devices", default="0-7", help="device ids, e.g. 0-7, 0-3 or 0,2,4,6 (default 0-7)")
    gen.add_argument("--server-id", help="this node's IP (default: what the host name resolves to)")
    gen.add_argument("--host-ip", help="optional host_ip field (this node's host IP)")
    gen.add_argument("--device-ips", help="ip0,ip1,... in --devices order, or 0=ip0,1=ip1,... "
                     "(default: from hccn_tool, then the hccn.conf file)")
    gen.add_argument("--hccn-tool", default=HCCN_TOOL, help=f"hccn_tool executable (default {HCCN_TOOL}, on PATH)")
    gen.add_argument("--hccn-conf", default=DEFAULT_HCCN_CONF, help=f"hccn.conf path (default {DEFAULT_HCCN_CONF})")
    gen.add_argument("-o", "--output", help="output file (default hccl_<n>p_<devices>_<server_id>.json)")
    val = sub.add_parser("validate", help="validate tables; exit 2 on the first invalid one")
    val.add_argument("files", nargs="+")
    merge = sub.add_parser("merge", help="merge tables in the given order, renumbering ranks")
    merge.add_argument("files", nargs="+")
    merge.add_argument("-o", "--output", required=True, help="output file")
    show = sub.add_parser("show", help="print a table")
    show.add_argument("files", nargs="+")
    return parser


def _generate(args: argparse.Namespace) -> int:
    device_ids = parse_device_list(args.devices)
    server_id = resolve_server_id(args.server_id)
    ips, source = discover_device_ips(device_ids, args.device_ips, args.hccn_tool, args.hccn_conf)
    table = build_single_server_table(server_id, ips, device_ids, host_ip=args.host_ip)
    out = Path(args.output or f"hccl_{len(device_ids)}p_{''.join(map(str, device_ids))}_{server_id}.json")
    write_rank_table(table, out)
    print(f"device IPs from {source}")
    print(format_rank_table(table, str(out)))
    print(f"wrote {out}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "generate":
        return _generate(args)
    if args.action == "validate":
        for name in args.files:
            table = load_rank_table(name)
            print(f"OK {name}: version {table.version}, {table.num_servers} server(s), {table.world_size} rank(s)")
        return 0
    if args.action == "merge":
        tables = [load_rank_table(name) for name in args.files]
        merged = merge_rank_tables(tables, names=args.files)
        write_rank_table(merged, args.output)
        print(format_rank_table(merged, args.output))
        print(f"wrote {args.output}")
        return 0
    for name in args.files:
        print(format_rank_table(load_rank_table(name), name))
    return 0
