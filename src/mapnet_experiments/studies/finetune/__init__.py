"""`mapnet repro finetune`: fine-tuning pretrained ImageNet networks through a latent (paper
§2.2.6, eq. 25) against the methods a user would pick instead. The rows and how they train:
`runs`; the page: `report`."""

from __future__ import annotations

from mapnet_experiments.studies.finetune import report as page
from mapnet_experiments.studies.finetune.runs import REPORT, RESULTS_DIR, STAGES, run_stage
from mapnet_experiments.studies.study import Options, Study


def _run(options: Options, stages: tuple[str, ...]) -> None:
    root = options.root_or(RESULTS_DIR)
    for stage in stages:
        rows = STAGES[stage]
        if options.rows is not None:
            rows = [row for row in rows if row.id in options.rows]
        run_stage(stage, rows, root, options.deadline, progress=options.progress)


def _report(options: Options) -> str:
    return page.report(options.root_or(RESULTS_DIR), options.report_or(REPORT), options.figures)


STUDY = Study(
    name="finetune",
    summary="fine-tuning ImageNet ResNet-50 / MobileNetV2 through a latent (eq. 25) against "
    "head-only, full, additive, peft LoRA and VeRA at matched budgets; stages select "
    "(learning rates on validation), transfer (Fashion-MNIST 64×64), deepfake (real vs "
    "face-swapped faces), steps (step time alone, 1 and 2 threads: run it on a quiet "
    "machine); one process per row; writes docs/results/finetune.md",
    stages=("select", "transfer", "deepfake", "steps"),
    default=("select", "transfer", "deepfake"),
    run=_run,
    report=_report,
    example="mapnet repro finetune --stages transfer --rows r50-mapnet-L250-2k",
    page="finetune.md",
    facts=page.facts,
)
