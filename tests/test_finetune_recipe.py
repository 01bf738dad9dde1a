"""The fine-tuning recipe (`mapnet repro finetune`) on a tiny stand-in network and generated data:
every method trains what it should, results carry what the table reports, stages resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mapnet_experiments.studies.finetune import report as finetune_report
from mapnet_experiments.studies.finetune import runs as finetune
from mapnet_experiments.studies.finetune.runs import Data, FinetuneRow, Setup
from mapnet_experiments.studies.fresh import in_fresh_process


class Tiny(nn.Module):
    """Stands in for a pretrained network: 1×1 and 3×3 convs, BatchNorm, a head named `fc`."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, classes)
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(h.mean((2, 3)))


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Data:
    def load_pretrained(name: str, num_classes: int | None = None, **_: object) -> nn.Module:
        torch.manual_seed(0)
        model = Tiny()
        if num_classes:
            model.fc = nn.Linear(6, num_classes)
        return model.eval()

    generator = torch.Generator().manual_seed(0)
    splits = {
        split: (
            torch.randint(0, 256, (n, 8, 8), dtype=torch.uint8, generator=generator),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for split, n in (("train", 24), ("val", 12), ("test", 12))
    }
    data = Data(splits, 3, lambda batch: batch.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1))
    monkeypatch.setattr(finetune.pretrained, "load_pretrained", load_pretrained)
    monkeypatch.setattr(finetune, "transfer_data", lambda setup, model: data)
    monkeypatch.setitem(finetune.SETUPS, "transfer", Setup(size=8, epochs=2, batch=8))
    return data


ROWS = [
    FinetuneRow("mapnet", "resnet50", "mapnet", 16, group_size=3, lr=1e-2),
    FinetuneRow("additive", "resnet50", "additive", 16, lr=1e-2),
    FinetuneRow("head", "resnet50", "head"),
    FinetuneRow("full", "resnet50", "full"),
    FinetuneRow("lora", "resnet50", "lora", 60, lr=1e-2),
    FinetuneRow("vera", "resnet50", "vera", 12, lr=1e-2),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_each_method_trains_its_numbers_and_reports_them(
    row: FinetuneRow, tiny: Data, tmp_path: Path
) -> None:
    result = finetune.run_row("transfer", row, tmp_path, progress=False)
    head = 6 * 3 + 3
    assert result["head_parameters"] == head
    expected_rest = {"mapnet": 16, "additive": 16, "head": 0, "full": 24 + 12 + 330}
    if row.method in expected_rest:
        assert result["trainable_besides_head"] == expected_rest[row.method]
    else:  # the adapters the plan chose, and no more
        assert result["trainable_besides_head"] == result["adapter_numbers"] > 0
    assert 0 <= result["test_accuracy"] <= 1 and len(result["history"]) == 2
    assert result["split_sizes"] == {"train": 24, "val": 12, "test": 12}
    assert result["checkpoint_bytes"] > 0 and result["step_seconds_median"] > 0
    # The same for every method: the head's rate, and BatchNorm statistics left pretrained.
    assert result["head_lr"] == finetune.HEAD_LR and result["batchnorm_statistics_unchanged"]
    json.dumps(result)  # what run_stage writes


def test_the_latent_moves_and_the_pretrained_weights_do_not(tiny: Data) -> None:
    model, _ = finetune.build(FinetuneRow("m", "resnet50", "mapnet", 16), 3)
    before = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    finetune.freeze_batchnorm_statistics(model)
    x, y = tiny.splits["train"]
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tiny.prepare(x)), y).backward()
        optimizer.step()
    assert model.latent.abs().sum() > 0
    for name, buffer in model.named_buffers():  # θ_pre and the frozen BatchNorm statistics
        assert torch.equal(buffer, before[name]), name


def test_learning_rate_comes_from_the_select_stage(tmp_path: Path) -> None:
    row = FinetuneRow("r", "resnet50", "lora", 100)
    with pytest.raises(FileNotFoundError, match="--stages select"):
        finetune.selected_lr(row, tmp_path)
    scores = dict.fromkeys(finetune.SELECT_LRS, 0.5) | {3e-3: 0.7, 1e-2: 0.7}  # a tie
    for lr, accuracy in list(scores.items())[:-1]:
        result = {"row": {"method": "lora", "lr": lr}, "val_accuracy": accuracy}
        path = tmp_path / "select" / f"lora-{lr}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result))
    with pytest.raises(
        FileNotFoundError, match=f"learning rate\\(s\\) \\[{finetune.SELECT_LRS[-1]}\\]"
    ):
        finetune.selected_lr(row, tmp_path)  # a partial grid does not choose
    lr = finetune.SELECT_LRS[-1]
    (tmp_path / "select" / "last.json").write_text(
        json.dumps({"row": {"method": "lora", "lr": lr}, "val_accuracy": scores[lr]})
    )
    assert finetune.selected_lr(row, tmp_path) == 3e-3  # the best; of a tie, the smaller
    assert finetune.selected_lr(FinetuneRow("h", "resnet50", "head"), tmp_path) == finetune.HEAD_LR


def test_a_stage_resumes_at_the_first_unfinished_row(tiny: Data, tmp_path: Path) -> None:
    calls: list[str] = []

    def runner(stage: str, row: FinetuneRow, root: Path, progress: bool) -> dict:
        calls.append(row.id)
        return finetune.run_row(stage, row, root, progress)

    rows = [ROWS[2], ROWS[0]]
    finished = tmp_path / "transfer" / "head.json"
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({"kept": True}))
    finetune.run_stage("transfer", rows, tmp_path, progress=False, runner=runner)
    assert calls == ["mapnet"]  # the finished row was skipped, not rerun
    assert json.loads(finished.read_text()) == {"kept": True}
    assert (tmp_path / "transfer" / "mapnet.json").exists()
    finetune.run_stage("transfer", rows, tmp_path, progress=False, runner=runner)
    assert calls == ["mapnet"]


def test_report_is_generated_from_the_result_files(tiny: Data, tmp_path: Path) -> None:
    for row in (ROWS[0], ROWS[2], ROWS[4]):
        out = tmp_path / "transfer" / f"{row.id}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finetune.run_row("transfer", row, tmp_path, progress=False)))
    text = finetune_report.report(tmp_path, tmp_path / "finetune.md")
    assert "## Transfer to Fashion-MNIST: ResNet-50" in text
    assert "mapnet ×(1+m), L = 3" in text and "head only" in text and "LoRA r = " in text
    assert text == (tmp_path / "finetune.md").read_text()
    figure = tmp_path / "finetune-resnet50.png"
    assert f"]({figure.name})" in text and figure.read_bytes()[:4] == b"\x89PNG"


def test_step_times_are_measured_at_each_thread_count(tiny: Data, tmp_path: Path) -> None:
    result = finetune.run_row("steps", ROWS[0], tmp_path, progress=False)
    assert set(result["step_seconds_median"]) == {str(t) for t in finetune.STEP_THREADS}
    assert all(v > 0 for v in result["step_seconds_median"].values())
    out = tmp_path / "steps" / "mapnet.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(result))
    trained = tmp_path / "transfer" / "mapnet.json"
    trained.parent.mkdir(parents=True)
    trained.write_text(json.dumps(finetune.run_row("transfer", ROWS[0], tmp_path, progress=False)))
    page = finetune_report.report(tmp_path, tmp_path / "finetune.md")
    assert " · " in page.split("mapnet ×(1+m)")[1]


def test_a_row_runs_in_a_fresh_process_that_imports_this_module(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The child imports the module by its own name: a stage the module does not know reaches
    run_row there (the import path was once left behind by a move)."""
    with pytest.raises(RuntimeError, match=f"row no-such-stage/{ROWS[0].id} failed"):
        in_fresh_process(finetune.run_row, "no-such-stage", ROWS[0], tmp_path, progress=False)
    assert "KeyError: 'no-such-stage'" in capfd.readouterr().err
