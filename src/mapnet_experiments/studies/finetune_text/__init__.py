"""`mapnet repro finetune-text`: a real pretrained transformer (all-MiniLM-L6-v2) fine-tuned on
real tweets through a latent, against what a user would pick instead (peft's LoRA, VeRA, IA3,
BitFit, full fine-tuning, the head alone) at equal budgets. The methods: models.text_methods;
the rows and how they train: `runs`; the page: `report`."""

from __future__ import annotations

from mapnet_experiments.studies.finetune_text import report as page
from mapnet_experiments.studies.finetune_text.runs import REPORT, RESULTS_DIR, STAGES, run_stage
from mapnet_experiments.studies.study import Options, Study


def _run(options: Options, stages: tuple[str, ...]) -> None:
    root = options.root_or(RESULTS_DIR)
    for stage in stages:
        rows = STAGES[stage]()
        if options.rows is not None:
            rows = [row for row in rows if row.id in options.rows]
        run_stage(stage, rows, root, options.deadline, progress=options.progress)


STUDY = Study(
    name="finetune-text",
    summary="all-MiniLM-L6-v2 fine-tuned on 3,000 real tweets (negative / neutral / positive) "
    "through a latent against peft LoRA, VeRA, IA3, BitFit, full fine-tuning and the head "
    "alone at ~2k, ~10k and ~50k trainable numbers; stages select (learning rates on "
    "validation), levers (mapnet variants, validation), final (3 seeds, test); one process "
    "per row; writes docs/results/finetune-text.md",
    stages=("select", "levers", "final"),
    default=("select", "final"),
    run=_run,
    report=lambda options: page.report(
        options.root_or(RESULTS_DIR), options.report_or(REPORT), figures=options.figures
    ),
    example="mapnet repro finetune-text --stages select --threads 1",
    page=REPORT.name,
    facts=page.facts,
)
