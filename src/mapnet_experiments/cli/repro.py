"""`mapnet repro STUDY`: the paper's tables and the studies beyond them, each a registered
`Study` (studies.registry) with its stages; this module only reads the registry."""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from mapnet_experiments.cli.arguments import positive_int
from mapnet_experiments.studies.registry import STUDIES
from mapnet_experiments.studies.study import Options

NOTES = """\
Finished runs are skipped and interrupted ones resume from their last epoch, so the same command
carries a long study across sessions (see --hours). A run is locked while it trains: start the
same command twice (with --threads 1) and the two processes share the table, each taking the
next free run. --report writes the study's page(s) from results/ alone.
"""


def _studies_text() -> str:
    lines = ["studies (stages in brackets; * = run when --stages is not given):", ""]
    for study in STUDIES.values():
        stages = ", ".join(s + ("*" if s in study.default else "") for s in study.stages)
        lines.append(f"{study.name} [{stages or 'no stages: it only writes pages'}]")
        lines += textwrap.wrap(
            study.summary,
            92,
            initial_indent="    ",
            subsequent_indent="    ",
            break_on_hyphens=False,  # "head-only" stays whole
        )
        lines += [f"    e.g. {study.example}", ""]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repro",
        help="reproduce the paper's tables and run the studies (resumable; results/<study>/)",
        description=_studies_text(),
        epilog=NOTES + "\nexamples:\n  mapnet repro table1 --datasets mnist --hours 2\n"
        "  mapnet repro finetune --stages select --threads 1\n"
        "  mapnet repro ablations --report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", choices=list(STUDIES), metavar="STUDY", help="one of the above")
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--stages", default=None, help="comma-separated stages (default: those *)")
    p.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    p.add_argument("--datasets", default="mnist,fashion-mnist", help="comma-separated")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run")
    p.add_argument(
        "--hours", type=float, default=None, help="start no new run after this many hours"
    )
    p.add_argument("--data-dir", default=None, help="read <data-dir>/<dataset>/ files")
    p.add_argument("--val-size", type=int, default=5000, help="validation images from train")
    p.add_argument("--root", type=Path, default=None, help="results folder (results/<study>)")
    p.add_argument("--report-to", type=Path, default=None, help="the page (docs/results/…)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument("--tsne", action="store_true", help="trajectory, space: also t-SNE")
    p.add_argument(
        "--no-figures", action="store_true", help="with --report: the pages' text only, no PNGs"
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="ablations, compression: seeds (default: %(default)s)"
    )
    p.set_defaults(run=run)


def options_from(args: argparse.Namespace) -> Options:
    if args.hours is not None and not args.hours > 0:
        raise ValueError(f"--hours must be > 0, got {args.hours}")
    try:
        seeds = tuple(int(seed) for seed in args.seeds.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    return Options(
        root=args.root,
        report_to=args.report_to,
        datasets=tuple(args.datasets.split(",")),
        rows=tuple(args.rows.split(",")) if args.rows else None,
        epochs=args.epochs,
        hours=args.hours,
        data_dir=args.data_dir,
        val_size=args.val_size,
        progress=not args.quiet,
        tsne=args.tsne,
        seeds=seeds,
        figures=not args.no_figures,
        started=time.monotonic(),
    )


def run(args: argparse.Namespace) -> int:
    study = STUDIES[args.study]
    stages = study.chosen(args.stages)
    options = options_from(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        study.run(options, stages)
    print(study.report(options))
    return 0
