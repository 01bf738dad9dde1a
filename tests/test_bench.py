"""`mapnet bench step`: the smoke run CI uses, the report, the targets' bookkeeping, ResNet-50."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mapnet.bases import seeded_initialisation
from mapnet_experiments.bench import (
    LOSS_TERM_STEPS,
    MALLOC_TUNED_ENV,
    STEP_VARIANTS,
    _dense_skip_reason,
    _memory_total_bytes,
    in_subprocess,
    target_parameter_count,
    targets_status,
)
from mapnet_experiments.cli import main
from mapnet_experiments.models import MODELS, ResNet50


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_step_smoke_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--smoke", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    data = json.loads(out.read_text())

    assert data["what"] == "step" and data["smoke"] is True
    assert data["command"].startswith("mapnet bench step --smoke")
    for key in ("cpu", "logical_cpus", "memory_bytes", "threads", "torch", "python"):
        assert key in data["machine"]
    for moment in ("start", "end"):
        assert "load average" in data["load"][moment]["uptime"]
        assert len(data["load"][moment]["loadavg"]) == 3

    rows = {row["variant"]: row for row in data["rows"]}
    assert list(rows) == [v.name for v in STEP_VARIANTS]  # every variant, none skipped here
    for name, row in rows.items():
        assert row["skipped"] is False, name
        assert _positive(row["ratio_to_plain"]), name
        assert all(_positive(r) for r in row["ratio_per_round"]), name
        assert _positive(row["step_ms_median"]) and _positive(row["peak_rss_bytes"]), name
        assert len(row["losses"]) == 2 and math.isfinite(row["loss_after"]), name
        assert row["target_parameters"] == 1498
        if name == "plain":
            assert row["ratio_to_plain"] == 1.0 and row["construction_seconds"] is None
            assert row["trainable_parameters"] == 1498 and row["projection_bytes"] == 0
        else:
            assert _positive(row["construction_seconds"]), name
            assert row["trainable_parameters"] == 64 and row["projection_bytes"] > 0, name
    # Structured W holds O(P) bytes, dense W holds P·d floats.
    assert rows["mapped-structured"]["projection_bytes_per_parameter"] <= 8
    assert rows["mapped-dense"]["projection_bytes"] == 1498 * 64 * 4

    (breakdown,) = data["breakdown"]
    assert breakdown["grad_check_max_abs_diff"] < 1e-5  # the phases compute mapped(x)'s gradient
    assert all(v >= 0 for v in breakdown["mapped_phases_ms"].values())
    assert _positive(breakdown["mapped_step_ms"]) and _positive(breakdown["plain_step_ms"])
    assert breakdown["profile_mapped"] and breakdown["profile_plain"]
    # Each mapping-loss term is timed on the same step, alone and all together.
    assert list(breakdown["loss_terms_ms"]) == list(LOSS_TERM_STEPS)
    assert all(_positive(v) for v in breakdown["loss_terms_ms"].values())
    assert breakdown["profile_all_loss_terms"]
    assert {t["target"] for t in data["targets"]} >= {
        "the 25M target trains from d=2048, single strategy (loss falls)"
    }

    report = tmp_path / "bench.md"
    args = ["bench", "step", "--report", "--out", str(out), "--report-out", str(report)]
    assert main(args) == 0
    text = report.read_text()
    assert "SMOKE RUN" in text and data["command"] in text
    assert "| tiny | mapped, single d, structured W |" in text
    assert "## Where a mapped step's time goes" in text
    assert "| + stability (one noisy forward) |" in text and "all three loss terms" in text


def test_report_without_results_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "step", "--report", "--out", str(tmp_path / "step.json")]
    assert main([*args, "--report-out", str(tmp_path / "bench.md")]) == 2
    assert "no step results" in capsys.readouterr().err


def test_a_measurement_in_a_fresh_process_gets_the_allocator_settings() -> None:
    kwargs = {"model": "tiny", "latent_dim": 64, "batch": 8, "warmup": 0, "steps": 1}
    row = in_subprocess("measure_step", env=MALLOC_TUNED_ENV, variant="plain", threads=1, **kwargs)
    assert row["malloc_env"] == MALLOC_TUNED_ENV and row["threads"] == 1
    assert row["minor_faults_per_step"] >= 0 and _positive(row["peak_rss_bytes"])


def test_dense_projection_of_the_25m_target_is_skipped_with_its_size() -> None:
    if not _memory_total_bytes():
        pytest.skip("no /proc/meminfo")
    reason = _dense_skip_reason(25_557_032, 2048)
    assert reason is not None and "209 GB" in reason
    assert _dense_skip_reason(108_618, 2048) is None  # CNN2: 0.9 GB fits


def _step(data_rows: list[dict]) -> dict:
    return {"rows": data_rows}


def test_targets_are_read_from_the_measurements_not_assumed() -> None:
    def row(model: str, variant: str, **figures: object) -> dict:
        return {"model": model, "variant": variant, "skipped": False, **figures}

    common = {
        "ratio_per_round": [1.2],
        "construction_seconds": 0.5,
        "projection_bytes_per_parameter": 7.1,
    }
    resnet = row(
        "resnet50",
        "mapped-structured",
        ratio_to_plain=1.0,
        ratio_per_round=[],
        construction_seconds=12.0,
        projection_bytes_per_parameter=9.0,
        lr=1e-3,
        losses=[7.0, 6.9],
        loss_first=7.0,
        loss_after=7.1,
    )
    rows = [
        row("cnn2", "mapped-structured", ratio_to_plain=1.05, **common),
        row("cnn1", "mapped-structured", ratio_to_plain=1.20, **common),
        resnet,
    ]
    status = targets_status(_step(rows), None)
    met = {t["target"]: t["met"] for t in status}
    assert met["step time mapped-structured / plain ≤ 1.10, cnn2"] is True
    assert met["step time mapped-structured / plain ≤ 1.10, cnn1"] is False
    assert met["construction < 1 s, cnn1"] is True
    assert met["construction < 10 s, resnet50"] is False
    assert met["projection memory ≤ 8 B per target parameter"] is False  # the worst model counts
    assert met["the 25M target trains from d=2048, single strategy (loss falls)"] is False
    assert all(t["met"] is None for t in targets_status(_step([]), None))


def test_resnet50_has_the_standard_layout_and_takes_small_inputs() -> None:
    assert MODELS["resnet50"] is ResNet50
    assert target_parameter_count("resnet50") == 25_557_032  # torchvision's resnet50
    torch.manual_seed(0)
    model = ResNet50(num_classes=10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # (B, classes)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # θ₀ regenerated by mapnet is this initialisation (He fan-out convs, BN γ=1, β=0).
    values, uncovered = seeded_initialisation(model, seed=3)
    assert not uncovered
    conv = values["layer4.0.conv2.weight"]  # (512, 512, 3, 3): fan-out 512·9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert torch.equal(values["layer1.0.bn1.weight"], torch.ones(64))
