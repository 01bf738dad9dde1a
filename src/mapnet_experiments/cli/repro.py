"""`mapnet repro …`: the paper's tables and the studies beyond them (studies/)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mapnet_experiments.cli.arguments import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repro",
        help="reproduce the paper's tables (resumable; results/<table>/*.json)",
        description=(
            "table1   every row of the paper's Table 1 (CNN1/CNN2 baselines, single and\n"
            "         layer-wise mappings) plus intrinsic-dimension training at 2048, on MNIST\n"
            "         and Fashion-MNIST; --report writes docs/results/table1.md.\n"
            "tuning   the Table 1 recipe against one-change variants (α, gains, learning rate,\n"
            "         σ, loss terms, epochs, seeds) on CNN2 d=2048, scored on the validation\n"
            "         split only; --report writes docs/results/tuning.md.\n"
            "finetune fine-tuning ImageNet ResNet-50 / MobileNetV2 through a latent (eq. 25)\n"
            "         against head-only, full, additive, peft LoRA and VeRA at matched budgets:\n"
            "         --stages select (learning rates on validation), transfer (Fashion-MNIST\n"
            "         64×64), deepfake (real vs face-swapped faces), steps (step time\n"
            "         alone, 1 and 2 threads: run it on a quiet machine); one process per row;\n"
            "         --report writes docs/results/finetune.md.\n"
            "ablations the paper's Tables 6-7 on CNN2 (what trains: Ours*, - WM, LV + WMAP,\n"
            "         Full DNN, LV + FullDNN; the mapping loss term by term), seeds 0-2:\n"
            "         --stages select (learning rates on validation), train; --report writes\n"
            "         docs/results/ablations.md.\n"
            "compression Table 8 (low-rank FC1, 90% pruning with fixed masks, int8 post-training\n"
            "         and quantisation-aware): --stages train, int8; --report writes\n"
            "         docs/results/compression.md.\n"
            "budget   accuracy against trainable numbers on Fashion-MNIST: mapnet single and\n"
            "         layer-wise, intrinsic dimension, small CNNs trained directly;\n"
            "         --report writes docs/results/budget.md and budget.png.\n"
            "forecasting Table 4: the LSTM air-quality forecaster (Beijing PM2.5) trained\n"
            "         directly, through a latent (64, 2048), by intrinsic dimension; persistence;\n"
            "         --report writes docs/results/forecasting.md and an example forecast.\n"
            "segmentation Table 3: the U-Net on scenes composed from MNIST and Fashion-MNIST\n"
            "         (Cityscapes is not reachable here; read_cityscapes reads it);\n"
            "         --report writes docs/results/segmentation.md and example predictions.\n"
            "trajectory paper Figure 2: CNN2 trained directly and through a latent from the same\n"
            "         θ0, weight snapshots projected by PCA (--tsne: also t-SNE, scikit-learn);\n"
            "         writes results/figures/trajectory-<dataset>.json and\n"
            "         docs/results/trajectory.png (first of --datasets).\n"
            "space    a model space: 12 CNN2 classifiers as latents of one mapping, 2 trained\n"
            "         with path flattening, plain controls; --stages train, analyse (paths,\n"
            "         soups, latent optimisation, distillation, PCA; --tsne: t-SNE too),\n"
            "         speed (256 members by vmap vs a loop: run it alone), inr (one SIREN per\n"
            "         image, classified from its latent: the paper's fixed θ₀, a learned θ₀,\n"
            "         and functa-style meta-learning on the full data sets; one process per\n"
            "         data set: --datasets mnist, --datasets fashion-mnist); --report writes\n"
            "         docs/results/space.md and its figures.\n\n"
            "Finished runs are skipped and interrupted ones resume from their last epoch, so\n"
            "the same command carries a long table across sessions (see --hours). A run is\n"
            "locked while it trains: start the same command twice (with --threads 1) and the\n"
            "two processes share the table, each taking the next free run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "table",
        choices=[
            "table1",
            "tuning",
            "finetune",
            "ablations",
            "compression",
            "budget",
            "trajectory",
            "forecasting",
            "segmentation",
            "space",
        ],
    )
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    p.add_argument("--datasets", default="mnist,fashion-mnist", help="comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 10)")
    p.add_argument(
        "--hours",
        type=float,
        default=None,
        help="start no new run after this many hours (a session's budget)",
    )
    p.add_argument("--data-dir", default=None, help="read <data-dir>/<dataset>/ IDX files")
    p.add_argument("--val-size", type=int, default=5000, help="validation images from train")
    p.add_argument("--root", type=Path, default=None, help="results folder (results/<table>)")
    p.add_argument("--report-to", type=Path, default=None, help="docs/results/<table>.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated stages, in order (finetune: select,transfer,deepfake; "
        "ablations: select,train; compression: train,int8)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads (default: torch's own count)",
    )
    p.add_argument("--tsne", action="store_true", help="trajectory: also t-SNE coordinates")
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="ablations / compression: comma-separated seeds to run (default: %(default)s)",
    )
    p.set_defaults(run=run)


def _run_finetune(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import finetune

    root = args.root or finetune.RESULTS_DIR
    if not args.report:
        deadline = time.monotonic() + 3600 * args.hours if args.hours else None
        for stage in (args.stages or "select,transfer,deepfake").split(","):
            if stage not in finetune.STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(finetune.STAGES)}")
            rows = finetune.STAGES[stage]
            if args.rows:
                known = {row.id: row for row in rows}
                rows = [known[i] for i in args.rows.split(",") if i in known]
            finetune.run_stage(stage, rows, root, deadline, progress=not args.quiet)
    print(finetune.report(root, args.report_to or finetune.REPORT))
    return 0


def run(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import table1 as repro

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.table == "finetune":
        return _run_finetune(args)
    if args.table in ("ablations", "compression", "budget"):
        return _run_paper_tables(args)
    if args.table in ("forecasting", "segmentation"):
        from mapnet_experiments.studies import forecasting, segmentation

        recipe = forecasting if args.table == "forecasting" else segmentation
        root = args.root or recipe.ROOT
        if not args.report:
            deadline = time.monotonic() + 3600 * args.hours if args.hours else None
            recipe.run(
                root,
                data_dir=args.data_dir,
                progress=not args.quiet,
                deadline=deadline,
                epochs=args.epochs or repro.EPOCHS,
            )
        out = args.report_to or recipe.REPORT
        if recipe is forecasting:
            print(forecasting.report(root, out, data_dir=args.data_dir))
        else:
            print(segmentation.report(root, out, data_dir=args.data_dir))
        figure = recipe.figure(root, out.with_name(recipe.FIGURE.name), data_dir=args.data_dir)
        print(figure or "(the example figure needs the seed-0 runs)")
        return 0
    if args.table == "space":
        from mapnet_experiments.studies.space import study as space_study

        root = args.root or space_study.ROOT
        if not args.report:
            for stage in (args.stages or "train,analyse").split(","):
                if stage == "train":
                    space_study.train_all(root, args.data_dir, progress=not args.quiet)
                elif stage == "analyse":
                    space_study.analyse(root, args.data_dir, tsne=args.tsne)
                elif stage == "speed":
                    space_study.speed(root)
                elif stage == "inr":
                    from mapnet_experiments.studies.space import inr as inr_study

                    datasets = tuple(args.datasets.split(","))
                    inr_study.run(root / "inr", args.data_dir, datasets)
                else:
                    raise ValueError(
                        f"unknown stage {stage!r} for space (train, analyse, speed, inr)"
                    )
        print(space_study.report(root, args.report_to or space_study.REPORT, args.data_dir))
        return 0
    if args.table == "trajectory":
        from mapnet_experiments.studies import trajectory

        dataset = args.datasets.split(",")[0]
        root = args.root or trajectory.ROOT
        source = root / f"trajectory-{dataset}.json"
        if not args.report:
            source = trajectory.run(
                dataset, tsne=args.tsne, root=root, data_dir=args.data_dir, progress=not args.quiet
            )
        out = args.report_to or trajectory.FIGURE
        print(trajectory.figure(source, out))
        if args.tsne:
            print(trajectory.figure(source, out.with_name(out.stem + "-tsne.png"), "tsne"))
        return 0
    tuning = args.table == "tuning"
    rows = repro.TUNING if tuning else repro.TABLE1
    root = args.root or (repro.TUNING_DIR if tuning else repro.TABLE1_DIR)
    report_to = args.report_to or Path(f"docs/results/{args.table}.md")
    datasets = tuple(args.datasets.split(","))
    if not args.report:
        known = {row.id: row for row in rows}
        wanted = args.rows.split(",") if args.rows else list(known)
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(known)}")
        deadline = time.monotonic() + 3600 * args.hours if args.hours else None
        repro.run_table(
            [known[i] for i in wanted],
            datasets,
            root,
            epochs=args.epochs or repro.EPOCHS,
            deadline=deadline,
            progress=not args.quiet,
            data_dir=args.data_dir,
            val_size=args.val_size,
            evaluate_test=not tuning,
        )
    report = repro.tuning_report if tuning else repro.report
    print(report(root, report_to, datasets))
    return 0


def _run_paper_tables(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import ablations as ablation_tables
    from mapnet_experiments.studies import budget
    from mapnet_experiments.studies.table1 import run_table

    deadline = time.monotonic() + 3600 * args.hours if args.hours else None
    if args.table == "budget":
        root = args.root or budget.ROOT
        if not args.report:
            done: list[str] = []
            while True:  # a later pass adds the small CNNs once their lr is chosen
                plan = budget.plan(root)
                if [row.id for row, _ in plan] == done:
                    break
                done = [row.id for row, _ in plan]
                run_table([], root=root, deadline=deadline, progress=not args.quiet, plan=plan)
        print(budget.report(root, args.report_to or budget.REPORT))
        return 0
    root = args.root or ablation_tables.ROOT
    defaults = {"ablations": "select,train", "compression": "train,int8"}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if not args.report:
        for stage in (args.stages or defaults[args.table]).split(","):
            if stage == "int8" and args.table == "compression":
                ablation_tables.int8_results(root, seeds, progress=not args.quiet)
            elif stage in ("select", "train"):
                # select: the runs the choices continue (table runs, test recorded), then the
                # candidates themselves, scored on validation only.
                tables = ["select-bases", "select"] if stage == "select" else [args.table]
                for table in tables:
                    run_table(
                        [],
                        root=root,
                        deadline=deadline,
                        progress=not args.quiet,
                        evaluate_test=table != "select",
                        plan=ablation_tables.plan(table, seeds),
                    )
            else:
                raise ValueError(f"unknown stage {stage!r} for {args.table}")
    print(ablation_tables.report(args.table, root, args.report_to))
    return 0
