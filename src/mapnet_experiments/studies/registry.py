"""Every study `mapnet repro` runs, by name, in the order `mapnet repro --help` lists them."""

from __future__ import annotations

from mapnet_experiments.studies import (
    ablations,
    budget,
    compression,
    finetune,
    finetune_text,
    forecasting,
    index,
    segmentation,
    table1,
    trajectory,
    tuning,
)
from mapnet_experiments.studies.space import study as space
from mapnet_experiments.studies.study import Study

_RUNS: tuple[Study, ...] = (
    table1.STUDY,
    tuning.STUDY,
    ablations.STUDY,
    compression.STUDY,
    budget.STUDY,
    finetune.STUDY,
    finetune_text.STUDY,
    forecasting.STUDY,
    segmentation.STUDY,
    trajectory.STUDY,
    space.STUDY,
)
STUDIES: dict[str, Study] = {study.name: study for study in _RUNS}
STUDIES["index"] = index.study(lambda: _RUNS)  # last: it reads the others' facts
