"""`mapnet bench`: the smoke runs CI uses (step, memory, inference), the trackers, the report,
the targets' bookkeeping, ResNet-50."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mapnet.bases import seeded_initialisation
from mapnet_experiments.bench.breakdown import LOSS_TERM_STEPS
from mapnet_experiments.bench.defaults import defaults_report
from mapnet_experiments.bench.harness import MALLOC_TUNED_ENV, in_subprocess, memory_total_bytes
from mapnet_experiments.bench.memory import measure_wrap_memory
from mapnet_experiments.bench.peak_memory import TRACKERS, PeakMemory
from mapnet_experiments.bench.step import _dense_skip_reason, measure_step, targets_status
from mapnet_experiments.bench.subjects import STEP_VARIANTS, target_parameter_count
from mapnet_experiments.bench.targets import release_targets
from mapnet_experiments.cli.main import main
from mapnet_experiments.models.networks import MODELS, ResNet50


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
    assert "| tiny | 1 | mapped, single d, structured W |" in text  # model, threads, variant
    assert "## Where a mapped step's time goes" in text
    assert "| + stability (one noisy forward) |" in text and "all three loss terms" in text


def test_construction_smoke_builds_in_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "construction.json"
    assert main(["bench", "construction", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["what"] == "construction" and data["machine"]["threads"] == 1
    (row,) = data["rows"]
    assert (row["model"], row["latent_dim"], row["strategy"]) == ("cnn2", 64, "single")
    assert row["trainable_parameters"] == 64 and row["threads"] == 1
    assert row["projection_bytes"] == row["target_parameters"] * 64 * 4  # dense W
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert _positive(row["construction_seconds"])


def test_report_without_results_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "step", "--report", "--out", str(tmp_path / "step.json")]
    assert main([*args, "--report-out", str(tmp_path / "bench.md")]) == 2
    assert "no step, memory or inference results" in capsys.readouterr().err


def test_a_measurement_in_a_fresh_process_gets_the_allocator_settings() -> None:
    kwargs = {"model": "tiny", "latent_dim": 64, "batch": 8, "warmup": 0, "steps": 1}
    row = in_subprocess(measure_step, env=MALLOC_TUNED_ENV, variant="plain", threads=1, **kwargs)
    assert row["malloc_env"] == MALLOC_TUNED_ENV and row["threads"] == 1
    assert row["minor_faults_per_step"] >= 0 and _positive(row["peak_rss_bytes"])


def test_a_fresh_process_finds_its_measurement_by_name_or_says_which_name_is_wrong() -> None:
    name = f"{measure_step.__module__}:measure_step"
    kwargs = {"model": "tiny", "variant": "plain", "latent_dim": 64, "batch": 2, "warmup": 0}
    assert in_subprocess(name, steps=1, threads=1, **kwargs)["variant"] == "plain"
    with pytest.raises(LookupError, match="has no function measure_stpe"):
        in_subprocess(f"{measure_step.__module__}:measure_stpe", **kwargs)
    with pytest.raises(LookupError, match=r"no module mapnet_experiments\.bench\.nowhere"):
        in_subprocess("mapnet_experiments.bench.nowhere:measure_step", **kwargs)
    with pytest.raises(ValueError, match=r"'measure_step' is not a 'package\.module:function'"):
        in_subprocess("measure_step", **kwargs)

    def local() -> dict:
        return {}

    with pytest.raises(ValueError, match="only import a module-level function"):
        in_subprocess(local)


def test_dense_projection_of_the_25m_target_is_skipped_with_its_size() -> None:
    if not memory_total_bytes():
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


# ----------------------------------------------------------------- v0.2 measurements


def test_step_measures_two_thread_counts_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    args = ["bench", "step", "--smoke", "--threads", "1", "2", "--variants", "mapped-structured"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["threads"] == [1, 2] and data["machine"]["threads"] == [1, 2]
    assert data["machine"]["mapnet"]  # the library's version: v0.2 targets read only such runs
    pairs = [(row["threads"], row["variant"]) for row in data["rows"]]
    assert pairs == [(1, "plain"), (1, "mapped-structured"), (2, "plain"), (2, "mapped-structured")]
    for row in data["rows"]:
        assert all(run["threads"] == row["threads"] for run in row["runs"])
        assert _positive(row["ratio_to_plain"])
    # The breakdown runs per thread count, through mapped.generate(), and its gradient matches.
    assert [b["threads"] for b in data["breakdown"]] == [1, 2]
    for breakdown in data["breakdown"]:
        assert breakdown["grad_check_max_abs_diff"] < 1e-5
        assert any("mapped.generate()" in phase for phase in breakdown["mapped_phases_ms"])
    assert "--threads 1 2" in data["command"]


def test_peak_memory_trackers_see_a_tensor_come_and_go() -> None:
    with PeakMemory("allocator") as peak:
        with peak.phase("big"):
            big = torch.ones(1_000_000)  # 4 MB, freed inside the block
            del big
        kept = torch.ones(1000)  # 4 kB, still held at the end
    result = peak.result()
    assert result["peak_bytes"] >= 4_000_000 and 4000 <= result["end_bytes"] < 100_000
    assert result["phases"]["big"]["peak_bytes"] >= 4_000_000
    assert result["peak_at"]  # the frames around the peak
    assert kept.numel() == 1000
    # RSS in a fresh process: this one may hold freed memory that a new tensor reuses.
    code = (
        "import json, torch; from mapnet_experiments.bench.peak_memory import PeakMemory\n"
        "with PeakMemory('rss') as peak:\n"
        "    touched = torch.ones(16_000_000)  # 64 MB, written, so resident\n"
        "    del touched\n"
        "print(json.dumps(peak.result()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rss_peak_reset"] is True and result["peak_bytes"] >= 60_000_000
    assert result["end_bytes"] < result["peak_bytes"]
    with pytest.raises(ValueError, match="tracker"):
        PeakMemory("heap")


def test_memory_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["what"] == "memory" and data["smoke"] is True
    assert data["command"].startswith("mapnet bench memory --smoke")
    assert {(r["tracker"], r["variant"]) for r in data["training"]} == {
        (t, v) for t in TRACKERS for v in ("plain", "mapped")
    }
    for row in data["training"]:
        assert row["kind"] == "training" and row["steps"] == 2 and len(row["losses"]) == 2
        assert row["peak_bytes"] >= row["end_bytes"] >= 0 and row["target_parameters"] == 1498
        if row["tracker"] == "allocator":
            assert row["peak_at"] and row["allocation_events"] > 0
            if row["variant"] == "plain":  # weights, gradients and Adam's two moments held
                assert row["end_bytes"] >= row["weights_bytes"] + row["optimizer_state_bytes"]
            else:  # θ₀ and W held; the latent's Adam state is 2·d floats
                assert row["end_bytes"] >= row["theta0_bytes"] + row["projection_bytes"]
                assert row["trainable_parameters"] == 64
        else:
            assert row["rss_peak_reset"] is True
    assert {(r["source"], r["tracker"]) for r in data["wrap"]} == {
        (s, t) for s in ("factory", "instance") for t in TRACKERS
    }
    for row in data["wrap"]:
        assert row["theta0_bytes"] == 1498 * 4  # one float32 θ₀
        assert row["budget_bytes"] == (
            row["weights_bytes"] + row["buffers_bytes"] + row["projection_bytes"] + 1498 * 4
        )
        assert row["peak_bytes"] >= row["wrap_peak_bytes"] >= 0
        if row["tracker"] == "allocator":
            assert row["end_bytes"] >= row["theta0_bytes"] + row["projection_bytes"]
    summary = data["summary"]
    assert len(summary["training"]) == 2 and len(summary["wrap"]) == 4
    allocator = next(c for c in summary["training"] if c["tracker"] == "allocator")
    assert _positive(allocator["ratio"])


def test_a_memory_measurement_runs_in_a_fresh_process() -> None:
    row = in_subprocess(
        measure_wrap_memory,
        model="tiny",
        source="instance",
        tracker="allocator",
        latent_dim=64,
        threads=1,
    )
    # The instance's weights were held before wrap() began, and wrap() dropped it afterwards.
    assert row["phases"]["wrap"]["start_bytes"] >= row["weights_bytes"]
    assert row["peak_bytes"] >= row["phases"]["wrap"]["start_bytes"]
    assert row["threads"] == 1 and _positive(row["process_peak_rss_bytes"])


def test_inference_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    assert main(["bench", "inference", "--smoke", "--threads", "1", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["what"] == "inference" and data["settings"]["threads"] == [1, 2]
    assert [(r["threads"], r["variant"]) for r in data["rows"]] == [
        (1, "plain"),
        (1, "mapped"),
        (2, "plain"),
        (2, "mapped"),
    ]
    for row in data["rows"]:
        assert row["repeat_output_equal"] is True  # the eval cache returns what it generated
        assert _positive(row["forward_ms_median"]) and _positive(row["first_call_ms_median"])
        assert _positive(row["ratio_to_plain"]) and len(row["ratio_per_round"]) == 1
        assert row["batch"] == 8 and row["input_shape"] == [1, 8, 8]
        if row["variant"] == "plain":
            assert row["ratio_to_plain"] == 1.0


def _release_runs() -> tuple[list[dict], list[dict], list[dict]]:
    """Hand-made results of each kind, as the benches write them."""
    v02 = {"mapnet": "0.2.0", "threads": [1, 2], "default_threads": 2}

    def timing(model: str, variant: str, threads: int, ratio: float, key: str, **extra: object):
        return {
            "model": model,
            "variant": variant,
            "threads": threads,
            "ratio_to_plain": ratio,
            "ratio_per_round": [ratio] * 5,
            "processes": 5,
            key: 10.0 * ratio,
            **extra,
        }

    step_rows = []
    for model, ratios in (("cnn2", (1.01, 1.07)), ("cnn1", (1.04, 1.0))):
        for threads, ratio in zip((1, 2), ratios):
            step_rows += [
                timing(model, "plain", threads, 1.0, "step_ms_median"),
                timing(model, "mapped-structured", threads, ratio, "step_ms_median"),
            ]
    step = {
        "machine": v02,
        "date": "2026-12-02",
        "file": "r/step-v02.json",
        "settings": {"batch": 128},
        "rows": step_rows,
    }
    older = {  # no library version: measured on earlier code, newer date, must not be used
        "machine": {"threads": 1},
        "date": "2026-12-03",
        "file": "r/old.json",
        "settings": {"batch": 128},
        "rows": [timing("cnn2", "mapped-structured", 1, 0.5, "step_ms_median")],
    }
    memory = {
        "machine": v02,
        "date": "2026-12-02",
        "file": "r/memory.json",
        "settings": {"model": "resnet50"},
        "summary": {
            "training": [
                {
                    "input_shape": [3, 224, 224],
                    "batch": 8,
                    "tracker": "allocator",
                    "ratio": 0.97,
                    "plain_peak_bytes": 1000,
                    "mapped_peak_bytes": 970,
                },
                {
                    "input_shape": [3, 224, 224],
                    "batch": 8,
                    "tracker": "rss",
                    "ratio": 1.2,
                    "plain_peak_bytes": 1000,
                    "mapped_peak_bytes": 1200,
                },
            ]
        },
        "wrap": [
            {"source": source, "tracker": tracker, "peak_bytes": peak, "budget_bytes": 100}
            for source, tracker, peak in (
                ("factory", "allocator", 90),
                ("factory", "rss", 130),
                ("instance", "allocator", 101),
                ("instance", "rss", 95),
            )
        ],
    }
    inference_rows = []
    for model in ("cnn2", "cnn1"):
        for threads, ratio in ((1, 1.01), (2, 1.03)):
            extra = {"batch": 128, "first_call_ms_median": 5.0, "repeat_output_equal": True}
            inference_rows += [
                timing(model, "plain", threads, 1.0, "forward_ms_median", **extra),
                timing(model, "mapped", threads, ratio, "forward_ms_median", **extra),
            ]
    inference = {
        "machine": v02,
        "date": "2026-12-02",
        "file": "r/inference.json",
        "rows": inference_rows,
    }
    return [step, older], [memory], [inference]


def test_release_targets_are_judged_from_the_newest_v02_measurements() -> None:
    steps, memories, inferences = _release_runs()
    status = {t["target"]: t for t in release_targets(steps, memories, inferences)}
    met = {name: t["met"] for name, t in status.items()}
    assert met["(a) training step mapped / plain ≤ 1.05: cnn2, batch 128, 1 thread"] is True
    assert met["(a) training step mapped / plain ≤ 1.05: cnn2, batch 128, 2 threads"] is False
    assert met["(a) training step mapped / plain ≤ 1.05: cnn1, batch 128, 2 threads"] is True
    first = status["(a) training step mapped / plain ≤ 1.05: cnn2, batch 128, 1 thread"]
    assert first["value"] == 1.01 and "step-v02.json" in first["source"]  # not the older run
    memory = "(b) peak training memory mapped / plain ≤ 1.00: ResNet-50, batch 8, 3×224×224, Adam"
    assert met[f"{memory} (tracked torch allocations)"] is True
    assert met[f"{memory} (peak RSS increase)"] is False
    wrap = "peak ≤ weights + buffers + W + one θ₀"
    assert met[f"(c) `wrap(ResNet50, cfg)` {wrap} (tracked torch allocations)"] is True
    assert met[f"(c) `wrap(ResNet50, cfg)` {wrap} (peak RSS increase)"] is False
    assert met[f"(c) `wrap(ResNet50(), cfg)` {wrap} (tracked torch allocations)"] is False
    inference = "(d) eval forward (no_grad) mapped / plain ≤ 1.02"
    assert met[f"{inference}: cnn1, batch 128, 1 thread"] is True
    assert met[f"{inference}: cnn1, batch 128, 2 threads"] is False
    assert not any("resnet50" in name for name in met)  # not measured: not listed
    # Nothing measured by this bench: every target listed, none judged.
    assert all(t["met"] is None for t in release_targets([steps[1]], [], []))


def test_report_renders_every_kind_and_the_targets(tmp_path: Path) -> None:
    results = tmp_path / "results"
    assert main(["bench", "memory", "--smoke", "--out", str(results / "memory-smoke.json")]) == 0
    assert main(["bench", "inference", "--smoke", "--out", str(results / "inf-smoke.json")]) == 0
    report = tmp_path / "bench.md"
    assert main(["bench", "report", "--results", str(results), "--report-out", str(report)]) == 0
    text = report.read_text()
    assert "SMOKE RUN" in text and "## Targets (v0.2)" in text
    for target in ("(a) training step", "(b) peak training memory", "(c) `wrap(", "(d) eval"):
        assert f"| {target}" in text
    assert "not measured" in text and "Not yet measured; run: `mapnet bench inference`" in text
    assert "## Memory: `mapnet bench memory --smoke" in text and "### `wrap()` (c)" in text
    assert "| 1×8×8 | allocator | mapped |" in text and "| factory | allocator |" in text
    assert "## Inference (d): `mapnet bench inference --smoke" in text
    assert "| tiny | 1×8×8 | 8 | 1 |" in text
    assert "## Earlier targets (issue 4)" not in text  # no step runs here


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "results" / "bench").is_dir(), reason="no committed results")
def test_committed_pages_regenerate_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From the repository root: the pages name their sources as `results/bench/…`.
    monkeypatch.chdir(ROOT)
    bench = tmp_path / "bench.md"
    assert main(["bench", "report", "--results", "results/bench", "--report-out", str(bench)]) == 0
    assert bench.read_bytes() == (ROOT / "docs" / "results" / "bench.md").read_bytes()
    defaults = tmp_path / "defaults.md"
    defaults_report(Path("results/bench"), defaults)
    assert defaults.read_bytes() == (ROOT / "docs" / "results" / "defaults.md").read_bytes()


def test_every_bench_measurement_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    for what, words in (
        ("step", ["--threads", "side by side", "mapped.generate()"]),
        ("memory", ["clear_refs", "torch.profiler", "one θ₀", "224"]),
        ("inference", ["torch.no_grad()", "first call", "(d)"]),
        ("finetune", ["fresh process", "peft LoRA", 'group_size="row"', "VmHWM"]),
        ("gpt2", ["fresh process", "Conv1D", "VmHWM", "--loss-curve", "examples"]),
        ("report", ["met / not met"]),
    ):
        with pytest.raises(SystemExit) as done:
            main(["bench", what, "--help"])
        assert done.value.code == 0, what
        help_text = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in help_text, (what, word)


def test_finetune_smoke_writes_every_figure(tmp_path: Path) -> None:
    from mapnet_experiments.bench.finetune import FINETUNE_METHODS, finetune_targets, refusal

    out = tmp_path / "results" / "finetune-smoke.json"
    assert main(["bench", "finetune", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["what"] == "finetune" and data["smoke"] is True
    assert data["command"].startswith("mapnet bench finetune --smoke")
    assert "load average" in data["load"]["start"]["uptime"]
    rows = {(r["model"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {
        (m, f.name) for m in ("tiny-cnn", "tiny-bert") for f in FINETUNE_METHODS if f.default
    }
    for (model, method), row in rows.items():
        reason = refusal(next(f for f in FINETUNE_METHODS if f.name == method), 64)
        if reason is not None:  # the row mode before it exists: skipped, saying why
            assert row["skipped"] and "group_size" in row["reason"], (model, method)
            continue
        assert row["skipped"] is False and row["threads"] == 1, (model, method)
        assert _positive(row["step_ms_median"]) and _positive(row["peak_rss_bytes"]), method
        assert row["trainable"] > row["head_numbers"] >= 0 or method == "head", method
        assert _positive(row["ratio_to_lora"]) and _positive(row["ratio_to_full"]), method
        assert _positive(row["rss_ratio_to_lora"]) and _positive(row["rss_ratio_to_full"]), method
        assert row["count"], method
        mapnet_method = method.startswith("mapnet")
        assert (row["generation_and_adjoint_ms"] is not None) == mapnet_method, method
        if mapnet_method:  # the generator alone, with and without its adjoint (at this size
            # their order is noise: a busy machine has timed the adjoint the faster)
            assert _positive(row["generation_and_adjoint_ms"]) and _positive(row["generation_ms"])
    assert rows[("tiny-cnn", "mapnet-l1")]["trainable"] == 64 + 170  # latent + the head
    eager = tmp_path / "results" / "finetune-eager-smoke.json"
    args = ["bench", "finetune", "--smoke", "--threads", "1", "--methods", "lora", "full"]
    assert main([*args, "mapnet-l1-eager", "--out", str(eager)]) == 0
    done = [r for r in json.loads(eager.read_text())["rows"] if r["method"].endswith("eager")]
    assert len(done) == 2  # one per model
    assert all(r["runs"][0]["fusion"] == "eager" for r in done)
    assert all(r["runs"][0]["compiled_kernels"] == 0 for r in done)
    placed = tmp_path / "results" / "finetune-placement-smoke.json"
    args = ["bench", "finetune", "--smoke", "--threads", "1", "--methods", "mapnet-row"]
    assert main([*args, "mapnet-row-last1", "--out", str(placed)]) == 0
    by = {(r["model"], r["method"]): r for r in json.loads(placed.read_text())["rows"]}
    assert by[("tiny-cnn", "mapnet-row-last1")]["skipped"]  # a CNN has no transformer layers
    assert "the last layer's" in by[("tiny-bert", "mapnet-row-last1")]["count"]
    assert (
        by[("tiny-bert", "mapnet-row-last1")]["trainable"]
        == by[("tiny-bert", "mapnet-row")]["trainable"]
    )  # the same latent, placed elsewhere (which rows: test_finetune_text)
    assert rows[("tiny-cnn", "full")]["ratio_to_full"] == 1.0
    # Every target is judged from the rows (or says why it is not measured).
    targets = finetune_targets(data)
    assert len(targets) == 6 and all(t["met"] is not None or t["detail"] for t in targets)

    report = tmp_path / "bench.md"
    args = ["bench", "finetune", "--report", "--out", str(out), "--report-out", str(report)]
    assert main(args) == 0
    text = report.read_text()
    assert "## Fine-tuning step: `mapnet bench finetune --smoke" in text
    assert "| mapnet L = 1 step ≤ 0.9× full fine-tuning's: tiny CNN (smoke) | 1 |" in text
    assert "### tiny BERT (smoke), batch 4, 1 thread" in text
    assert "| peft IA3 |" in text and "| BitFit (biases + head) |" in text
    assert "share of the step" in text


def test_gpt2_smoke_writes_every_figure(tmp_path: Path) -> None:
    from mapnet_experiments.bench.gpt2 import BUDGET, VARIANTS

    out = tmp_path / "results" / "gpt2-smoke.json"
    assert main(["bench", "gpt2", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["what"] == "gpt2" and data["smoke"] is True
    assert data["command"].startswith("mapnet bench gpt2 --smoke")
    rows = {row["variant"]: row for row in data["rows"]}
    assert list(rows) == list(VARIANTS)
    generated = rows["full"]["generated_parameters"]
    for name, row in rows.items():
        assert row["failed"] is None, (name, row["failed"])
        assert _positive(row["step_seconds_median"]) and _positive(row["peak_rss_bytes"]), name
        assert row["build_seconds_median"] >= 0 and row["generated_parameters"] == generated
        assert _positive(row["checkpoint_bytes"]), name
        assert row["bytes_per_generated_parameter"] == row["checkpoint_bytes"] / generated
        assert len(row["runs"][0]["losses"]) == 3 and all(
            math.isfinite(x) for x in row["runs"][0]["losses"]
        )
    assert rows["full"]["trainable"] == generated
    assert rows["mapnet-l1"]["trainable"] == rows["mapnet-row"]["trainable"] == BUDGET
    assert abs(rows["lora"]["trainable"] - BUDGET) <= 0.1 * BUDGET
    path = rows["mapnet-row"]["row_path"]  # the tied embedding takes the activation path
    assert "transformer.wte (Embedding)" in path["activation_path"]
    assert path["conv1d_on_activation_path"] is True
    assert "Conv1D" not in path["weight_path_by_class"]
    assert rows["mapnet-row"]["bytes_per_generated_parameter"] < 1  # the latent, not θ

    # Loss curves: 2 steps, then 3 going on from the saved state.
    curve = tmp_path / "results" / "gpt2-loss-smoke.json"
    args = ["bench", "gpt2", "--smoke", "--loss-curve", "--threads", "1", "--out", str(curve)]
    assert main([*args, "--loss-steps", "2"]) == 0
    assert main([*args, "--loss-steps", "3"]) == 0
    curves = json.loads(curve.read_text())
    assert curves["what"] == "gpt2-loss" and set(curves["curves"]) == {"mapnet-row", "lora"}
    for name, run in curves["curves"].items():
        assert run["resumed_from"] == 2 and len(run["losses"]) == 3, name
        assert all(math.isfinite(x) for x in run["losses"]), name

    report = tmp_path / "bench.md"
    assert main(["bench", "gpt2", "--report", "--out", str(out), "--report-out", str(report)]) == 0
    text = report.read_text()
    assert "## GPT-2 small fine-tuning step: `mapnet bench gpt2 --smoke" in text
    assert "| peft LoRA | 4,096 |" in text and "on the weight path" in text
    assert "## GPT-2 small loss curves" in text
    assert (tmp_path / "bench-gpt2-loss.png").stat().st_size > 0
