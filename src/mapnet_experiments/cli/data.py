"""`mapnet data fetch`: fetch and verify the data sets ahead of time."""

from __future__ import annotations

import argparse
import time

from mapnet_experiments.data.mnist import DATASETS, fetch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="fetch and verify data sets",
        description="Fetch MNIST / Fashion-MNIST into the cache (or check $MAPNET_DATA_DIR).",
    )
    p.add_argument("action", choices=["fetch"])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(DATASETS)}")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.names) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown data set(s) {unknown}; known: {', '.join(DATASETS)}")
    for name in args.names or DATASETS:
        started = time.perf_counter()
        folder = fetch(name)
        print(f"{name}: verified in {folder} ({time.perf_counter() - started:.1f} s)")
    return 0
