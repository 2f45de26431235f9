"""``python -m pytest_virtio.results merge``: shards of one suite judged together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.finish import judge_relative
from pytest_virtio.results.plot import write_chart
from pytest_virtio.results.records import SessionResults, load_session, write_json
from pytest_virtio.results.render import render_table


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_virtio.results merge shard*.json [--plot F] [--json F]``.

    One verdict for a suite sharded across CI runners or xdist remote workers:
    every shard's records and relative checks are merged; (machine,
    accelerator) stay apart in the table, the chart and the relative checks.
    Exit status 1 when a relative check failed, 2 on bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m pytest_virtio.results")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge --virtio-json files and judge them together")
    merge.add_argument("shards", nargs="+", help="--virtio-json files of the shards")
    merge.add_argument("--plot", help="write the merged chart (.svg or .png)")
    merge.add_argument("--json", help="write the merged results JSON")
    merge.add_argument("--inconclusive", choices=("pass", "fail"), default="pass",
                       help="whether an inconclusive relative check fails (exit 1)")
    args = parser.parse_args(argv)
    merged = SessionResults()
    try:
        for shard in args.shards:
            one = load_session(shard)
            merged.records.extend(one.records)
            merged.checks.extend(one.checks)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    judgement = judge_relative(merged)
    print(f"{len(args.shards)} shard(s), {len(merged.records)} record(s), "
          f"machines: {', '.join(sorted({r.machine for r in merged.records})) or 'none'}")
    print(render_table(merged.records))
    for line in judgement.lines:
        print(line)
    if args.json:
        write_json(merged.records, args.json, merged.checks)
        print(f"results JSON written to {Path(args.json).resolve()}")
    if args.plot and merged.records:
        try:
            write_chart(merged.records, args.plot, judgement.verdicts)
        except (ConfigError, OSError) as exc:
            print(f"chart NOT written to {args.plot}: {exc}", file=sys.stderr)
            return 2
        print(f"chart written to {Path(args.plot).resolve()}")
    return 1 if judgement.fails_session(args.inconclusive) else 0


if __name__ == "__main__":
    sys.exit(main())
