"""`python -m bench` lists the benchmarks; `python -m bench NAME [OPTIONS]` runs one,
`python -m bench all` runs every one with its default options."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import RESULTS_DIR, Benchmark, BenchError, discover, format_table, progress, write_results


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help=f"where the JSON results go (default: {RESULTS_DIR})")
    common.add_argument("--no-json", action="store_true", help="print the table only")
    return common


def _parsers(benchmarks: dict[str, Benchmark]) -> tuple[argparse.ArgumentParser,
                                                         dict[str, argparse.ArgumentParser]]:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    subs: dict[str, argparse.ArgumentParser] = {}
    for bench in benchmarks.values():
        p = sub.add_parser(bench.name, help=bench.help, description=bench.help, parents=[common])
        bench.add_arguments(p)
        subs[bench.name] = p
    sub.add_parser("all", help="run every available benchmark with its defaults", parents=[common])
    return parser, subs


def _list(benchmarks: dict[str, Benchmark]) -> None:
    print("benchmarks (python -m bench NAME --help for options; `all` runs every one):")
    width = max((len(n) for n in benchmarks), default=0)
    for bench in benchmarks.values():
        why = bench.unavailable()
        print(f"  {bench.name.ljust(width)}  {bench.help}" + (f"  [unavailable: {why}]" if why else ""))


def _run_one(bench: Benchmark, args: argparse.Namespace) -> bool:
    why = bench.unavailable()
    if why:
        progress(f"{bench.name}: skipped ({why})")
        return False
    started = time.time()
    try:
        rows = bench.run(args)
    except BenchError as e:
        progress(f"{bench.name}: FAILED\n{e}")
        return False
    print(f"== {bench.name}")
    print(format_table(rows))
    if not args.no_json:
        path = write_results(bench.name, args, rows, started, args.results_dir)
        print(f"results: {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    benchmarks = discover()
    parser, subs = _parsers(benchmarks)
    args = parser.parse_args(argv)
    if args.benchmark is None:
        _list(benchmarks)
        return 0
    if args.benchmark != "all":
        return 0 if _run_one(benchmarks[args.benchmark], args) else 1
    ok = True
    for name, bench in benchmarks.items():
        # Each benchmark's own defaults, with the common options given to `all`.
        own = subs[name].parse_args([])
        own.results_dir, own.no_json = args.results_dir, args.no_json
        ok = _run_one(bench, own) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
