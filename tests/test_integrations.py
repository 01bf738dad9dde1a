"""The tools users train with, each tested with the real package: PyTorch Lightning, the Hugging
Face Trainer and peft, and the examples in docs/examples/ that show them.

What each writes:
- Lightning: its own `.ckpt`, a torch.save (pickle) of a dict whose "state_dict" is the
  LightningModule's, so the mapped model's latents and `_extra_state` under "net."; it loads
  with `weights_only=True` (tensors, numbers and strings only).
- HF Trainer: `model.safetensors` (a MappedModule is not a PreTrainedModel, so the Trainer writes
  `state_dict()` as it is) in `save_model`'s folder and in each checkpoint-N folder; checkpoint-N
  also holds the Trainer's own optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin
  (torch.save, pickle).
- peft inside a mapping: mapnet's checkpoint folder (safetensors) holds the LoRA weights too;
  peft's `save_pretrained` of the inner model writes its usual adapter file.

The heavy packages are imported inside the tests. Every model is tiny and trains for a few
dozen steps on generated data, so the file takes well under a minute.
"""

from __future__ import annotations

import importlib.util
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mapnet

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "docs" / "examples"


def _import(path: Path) -> ModuleType:
    """A helper module by path, whatever pytest's import mode."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _same_tensors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return sorted(map(id, actual)) == sorted(map(id, expected))


# ---------------------------------------------------------------- PyTorch Lightning


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # lightning 2.6 on torch 2.13, not ours
def test_lightning_trains_the_latent_and_its_checkpoint_reloads_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    worker = _import(TESTS / "lightning_worker.py")
    lit = worker.MappedClassifier(latent_dim=16, seed=3, lr=0.2)
    x, y = worker.data(64, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = L.Trainer(
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[checkpoint],
    )
    trainer.fit(lit, loader)

    assert _same_tensors(_optimized(trainer.optimizers[0]), [lit.net.latent])
    assert lit.net.latent.abs().sum() > 0  # it starts at z = 0
    assert sum(lit.losses[-4:]) < sum(lit.losses[:4])

    path = Path(checkpoint.best_model_path)
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 12
    assert sorted(saved["state_dict"]) == ["net._extra_state", "net.latents.0"]
    assert saved["optimizer_states"]  # Lightning resumes Adam's moments from the same file

    probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    save_file({"x": probe}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        save_file({"out": lit.eval()(probe)}, tmp_path / "here.safetensors")
    command = [sys.executable, str(TESTS / "lightning_worker.py"), str(path)]
    command += [str(tmp_path / "inputs.safetensors"), str(tmp_path / "there.safetensors")]
    run = subprocess.run(command, timeout=180, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    here, there = (load_file(tmp_path / f"{name}.safetensors") for name in ("here", "there"))
    assert torch.equal(there["lightning"], here["out"])
    assert torch.equal(there["plain"], here["out"])


# ---------------------------------------------------------------- Hugging Face Trainer


def _tiny_bert(masked_lm: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    config = BertConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        # No dropout: a run resumed from a checkpoint must replay the same steps exactly.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config) if masked_lm else BertForSequenceClassification(config)


class StartsWithFive(torch.utils.data.Dataset):
    """Sequences of 12 tokens; label 1 (every other one) when the first token is 5.

    BERT's classifier reads the first position, so a latent learns this in a few dozen steps;
    "token 5 appears anywhere" needs attention to learn and stayed at chance for 150 steps."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 16, (count, 12), generator=generator)
        self.labels = torch.arange(count) % 2
        self.ids[self.labels == 1, 0] = 5

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": self.labels[index],
        }

    def inputs(self) -> dict[str, torch.Tensor]:
        """Every sequence as one batch, without labels."""
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}


def _trainer(model: nn.Module, output_dir: Path, **overrides: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 40,
        "per_device_train_batch_size": 32,
        "learning_rate": 0.1,  # Adam on the latent: each step moves z by about this much
        "lr_scheduler_type": "constant",
        "save_steps": 20,
        "logging_steps": 10,
        "seed": 0,
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # The Trainer reads label names from the model's class, and MappedModule.forward only
        # carries the target's signature on the instance: without this, evaluate() reports no
        # loss and compute_metrics is never called.
        "label_names": ["labels"],
    }

    def accuracy(prediction: Any) -> dict[str, float]:
        return {
            "accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
        }

    return Trainer(
        model=model,
        args=TrainingArguments(**(settings | overrides)),
        train_dataset=StartsWithFive(512, seed=0),
        eval_dataset=StartsWithFive(256, seed=1),
        compute_metrics=accuracy,
    )


def _logits(mapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return mapped.eval()(**batch).logits


def _fresh(factory: Callable[[], nn.Module], **settings: Any) -> mapnet.MappedModule:
    return mapnet.wrap(factory, mapnet.MappingConfig(**settings))


def test_hf_trainer_trains_the_latent_and_its_checkpoints_reload_exactly(tmp_path: Path) -> None:
    settings = {"latent_dim": 256, "seed": 1}
    mapped = _fresh(_tiny_bert, **settings)
    trainer = _trainer(mapped, tmp_path / "run")
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert _same_tensors(_optimized(trainer.optimizer), [mapped.latent])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]
    assert before["eval_accuracy"] < 0.7  # θ₀, the untrained BERT: about chance
    assert after["eval_accuracy"] > 0.95
    assert after["eval_loss"] < before["eval_loss"]

    trainer.save_model(str(tmp_path / "final"))
    batch = StartsWithFive(16, seed=2).inputs()
    expected = _logits(mapped, batch)
    for folder in ("final", "run/checkpoint-40"):
        state = load_file(tmp_path / folder / "model.safetensors")
        assert sorted(state) == ["_extra_state", "latents.0"]
        reloaded = _fresh(_tiny_bert, **settings)
        reloaded.load_state_dict(state)  # strict, identity checked
        assert torch.equal(_logits(reloaded, batch), expected)

    # The Trainer's own resume path: a fresh mapped model from checkpoint-20 ends where the
    # uninterrupted run did (latent, optimizer, scheduler and data order all restored).
    resumed = _fresh(_tiny_bert, **settings)
    _trainer(resumed, tmp_path / "run").train(
        resume_from_checkpoint=str(tmp_path / "run/checkpoint-20")
    )
    assert torch.equal(resumed.latent, mapped.latent)


def test_hf_trainer_saves_a_mapped_model_with_tied_weights_trained_directly(
    tmp_path: Path,
) -> None:
    """BERT's word embeddings are tied to the masked-LM decoder. Trained directly, they are one
    tensor under two names; the state holds it once (safetensors refuses shared storage) and
    loading restores both names."""
    factory = lambda: _tiny_bert(masked_lm=True)  # noqa: E731
    settings = {"latent_dim": 64, "train_directly": ("*word_embeddings*",)}
    mapped = _fresh(factory, **settings)
    target = mapped.target
    assert target.cls.predictions.decoder.weight is target.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        mapped.latent.normal_()
        target.bert.embeddings.word_embeddings.weight.mul_(2)  # differs from θ₀ now

    _trainer(mapped, tmp_path / "run").save_model(str(tmp_path / "final"))
    state = load_file(tmp_path / "final" / "model.safetensors")
    assert "target.bert.embeddings.word_embeddings.weight" in state
    assert "target.cls.predictions.decoder.weight" not in state
    reloaded = _fresh(factory, **settings)
    reloaded.load_state_dict(state)
    tied = reloaded.target
    assert tied.cls.predictions.decoder.weight is tied.bert.embeddings.word_embeddings.weight
    batch = StartsWithFive(4, seed=3).inputs()
    assert torch.equal(_logits(reloaded, batch), _logits(mapped, batch))

    # A state that still holds both names (mapnet 0.2.0) loads as well.
    both = dict(state)
    both["target.cls.predictions.decoder.weight"] = both[
        "target.bert.embeddings.word_embeddings.weight"
    ]
    _fresh(factory, **settings).load_state_dict(both)


# ---------------------------------------------------------------- peft


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _lora_on_fc2() -> nn.Module:
    """peft first: LoRA on fc2. peft freezes every parameter but its adapters, and mapnet
    generates only parameters that train, so fc1 is made trainable again for the mapping."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(ThreeLayers(), LoraConfig(r=2, target_modules=["fc2"]))
    model.base_model.model.fc1.requires_grad_(True)
    return model


# fc1 is generated; LoRA trains as ordinary parameters (unselected ones would be frozen).
PEFT_MAPPING = mapnet.MappingConfig(
    latent_dim=16, target_modules=("*.fc1",), train_directly=("*lora_*",)
)


def _steps(model: nn.Module, count: int) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(count):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_a_peft_adapter_inside_a_mapping_trains_saves_and_reloads(tmp_path: Path) -> None:
    mapped = mapnet.wrap(_lora_on_fc2, PEFT_MAPPING)
    lora = "target.base_model.model.fc2.lora_{}.default.weight"
    trainable = {name for name, p in mapped.named_parameters() if p.requires_grad}
    assert trainable == {"latents.0", lora.format("A"), lora.format("B")}
    assert [spec.name for spec in mapped.specs] == [
        "base_model.model.fc1.weight",
        "base_model.model.fc1.bias",
    ]
    params = dict(mapped.named_parameters())
    start = {name: params[name].detach().clone() for name in trainable}
    frozen = {n: p.detach().clone() for n, p in params.items() if n not in trainable}

    _steps(mapped, 1)
    # LoRA's B starts at zero, so A's first gradient is zero; the latent and B get one.
    assert params["latents.0"].grad.abs().sum() > 0
    assert params[lora.format("B")].grad.abs().sum() > 0
    _steps(mapped, 2)
    assert all(not torch.equal(params[n], start[n]) for n in trainable)
    assert all(torch.equal(params[n], value) for n, value in frozen.items())

    folder = mapnet.save(mapped, tmp_path / "ckpt")
    reloaded = mapnet.load(folder, _lora_on_fc2)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), mapped.eval()(x))
    for name in trainable:
        assert torch.equal(dict(reloaded.named_parameters())[name], params[name])

    # peft's own adapter file, written from inside the mapping, holds the same LoRA weights.
    mapped.target.save_pretrained(str(tmp_path / "adapter"))
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved_b = adapter["base_model.model.fc2.lora_B.weight"]
    assert torch.equal(saved_b, params[lora.format("B")].detach())


def test_peft_applied_to_a_mapped_model_freezes_the_latent() -> None:
    """The other order works only with a repair: peft marks everything but its adapters as
    frozen, the latent included, so the mapping would not train; and peft then rewrites
    the target after mapnet recorded its layout."""
    from peft import LoraConfig, get_peft_model

    mapped = mapnet.wrap(ThreeLayers, latent_dim=16, target_modules=("fc1",))
    model = get_peft_model(mapped, LoraConfig(r=2, target_modules=["fc2"]))
    assert not mapped.latent.requires_grad
    mapped.latent.requires_grad_(True)
    before = mapped.latent.detach().clone()
    _steps(model, 2)
    assert not torch.equal(mapped.latent, before)
    assert "target.fc2.base_layer.weight" in mapped.state_dict()


# ---------------------------------------------------------------- docs/examples


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # lightning 2.6 on torch 2.13, not ours
@pytest.mark.parametrize(
    ("example", "claim"),
    [
        ("lightning_example.py", "reloaded outputs identical: True"),
        ("hf_trainer_example.py", "reloaded outputs identical: True"),
        ("peft_with_mapnet.py", "reloaded outputs identical: True"),
        ("finetune_transformer.py", "reloaded outputs identical: True"),
    ],
)
def test_example_runs_and_reports(
    example: str, claim: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = EXAMPLES / example
    assert len(path.read_text().splitlines()) <= 40
    monkeypatch.setattr(sys, "argv", [str(path)])  # no arguments: the examples' own models
    runpy.run_path(str(path), run_name="__main__")
    assert claim in capsys.readouterr().out
