"""`python -m bench all|retrain|predict|accuracy|webhook|gpu|text|loop|active|trust|guard|retention|table
[--quick]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = ("retrain", "predict", "accuracy", "webhook", "gpu", "text")
# not part of `all`: it starts a real Label Studio and labels for minutes (see bench/README.md)
LABEL_STUDIO_BENCHMARKS = ("loop", "active")
# not part of `all` either: the label audit's measurement, minutes of cross-validation per cell (bench/README.md)
AUDIT_BENCHMARKS = ("trust",)
# nor this one: the guard's and the audit's noise, minutes of trainings one label apart (bench/README.md)
GUARD_BENCHMARKS = ("guard",)
# nor this one: Redis memory, not time (bench/README.md)
MEMORY_BENCHMARKS = ("retention",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=("all", *BENCHMARKS, *LABEL_STUDIO_BENCHMARKS, *AUDIT_BENCHMARKS,
                                         *GUARD_BENCHMARKS, *MEMORY_BENCHMARKS, "table"),
                        help="a benchmark, all of them but loop (then the table), or only the table")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, to check the code runs (results are not meaningful; they go to a "
                             "temporary directory unless --results-dir is given). loop: N = 1,000 tasks, its "
                             "measured CI size, written under `quick` in bench/results/loop.json")
    parser.add_argument("--tasks", type=int,
                        help="loop only: this many tasks instead of 1,000 (--quick) or 5,000, a smoke run "
                             "(results in a temporary directory unless --results-dir is given)")
    parser.add_argument("--text", action="store_true",
                        help="loop only: a text project of bbc-news articles on all-MiniLM-L6-v2 instead of images "
                             "(results in bench/results/loop-text.json)")
    parser.add_argument("--zero-shot", action="store_true",
                        help="accuracy only: measure just k=0 (zero-shot pre-labels, under a minute) and merge it "
                             "into the accuracy results, keeping their other keys")
    parser.add_argument("--seeds", type=int, help="active only: seeds per set (default 3; 1 with --quick)")
    parser.add_argument("--sets", help="active only: comma-separated sets to measure (default hymenoptera,flowers12); "
                                       "the others keep their earlier results in active.json")
    parser.add_argument("--results-dir", type=Path, help="where the JSON results go (default: bench/results)")
    args = parser.parse_args(argv)
    if (args.tasks is not None or args.text) and args.name != "loop":
        parser.error("--tasks and --text apply to loop only")
    if (args.seeds is not None or args.sets is not None) and args.name != "active":
        parser.error("--seeds and --sets apply to active only")
    if args.zero_shot and args.name != "accuracy":
        parser.error("--zero-shot applies to accuracy only")
    from bench.data import ensure_weights
    from bench.harness import RESULTS_DIR
    from bench.table import update_readme

    if args.name == "table":
        print(update_readme(results_dir=args.results_dir or RESULTS_DIR))
        return 0
    measured = args.tasks is None if args.name == "loop" else not args.quick or args.name == "active"
    results_dir = args.results_dir or (RESULTS_DIR if measured else Path(tempfile.gettempdir()) / "headstart-bench-quick")
    ensure_weights()
    names = BENCHMARKS if args.name == "all" else (args.name,)
    started = time.monotonic()
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n=== {name} ===", flush=True)
        began = time.monotonic()
        options = ({"tasks": args.tasks, "text": args.text} if name == "loop"
                   else {"zero_shot_only": True} if args.zero_shot else {})
        if name == "active":
            options = {"seeds": args.seeds, **({"sets": tuple(args.sets.split(","))} if args.sets else {})}
        module.run(quick=args.quick, results_dir=results_dir, **options)
        print(f"({name}: {time.monotonic() - began:.0f} s)", flush=True)
    if args.name == "all" and results_dir == RESULTS_DIR:
        print(update_readme())
    print(f"\nbench {args.name}: {time.monotonic() - started:.0f} s; results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
