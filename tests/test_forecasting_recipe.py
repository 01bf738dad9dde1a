"""`mapnet repro forecasting` end to end on a generated single-site file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mapnet_experiments.studies import forecasting
from test_forecasting_data import write_single_site


def test_the_forecasting_table_runs_reports_and_draws(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "beijing-pm25").mkdir(parents=True)
    hours = [str(50 + 40 * math.sin(i / 5)) if i % 17 else "" for i in range(400)]
    write_single_site(data / "beijing-pm25" / "PRSA_data_2010.1.1-2014.12.31.csv.gz", hours)
    root = tmp_path / "results"
    written = forecasting.run(root, data_dir=str(data), progress=False, epochs=1)
    assert len(written) == len(forecasting.SPECS) * len(forecasting.SEEDS)
    result = json.loads((root / "ours-64-s1-beijing-pm25.json").read_text())
    assert result["task"] == "regression" and result["trainable_parameters"] == 64
    text = forecasting.report(root, tmp_path / "f.md", data_dir=str(data))
    naive = forecasting.persistence(str(data))
    assert f"| persistence (last hour's value) | 0 | – | – | {naive['test']:.6f}" in text
    lstm = next(line for line in text.splitlines() if line.startswith("| LSTM trained directly"))
    assert "| 0.0035 | 0.000298 |" in lstm and "| 5,793 |" in lstm  # 11 inputs here
    figure = forecasting.figure(root, tmp_path / "f.png", data_dir=str(data), hours=50)
    assert figure is not None and figure.stat().st_size > 10_000
