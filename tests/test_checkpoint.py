from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mapnet
from mapnet.checkpoint.io import CONFIG_FILE, TENSOR_FILE, CheckpointError
from mapnet.config import MappingConfig

# The model lives in an importable module so a fresh interpreter can rebuild it.
MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 5)
            self.gate = nn.Parameter(torch.rand(5))  # no reset_parameters: θ₀ is stored

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)) * self.gate
    """
)


@pytest.fixture
def net_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "netdef.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import netdef

    return importlib.reload(netdef)


def trained(net_module, config: MappingConfig) -> mapnet.MappedModule:
    torch.manual_seed(0)
    mapped = mapnet.wrap(net_module.Net(), config)
    optimizer = torch.optim.Adam(mapped.parameters(), lr=0.05)
    mapped.train()
    for _ in range(3):
        loss = mapped(torch.randn(8, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mapped.eval()


@pytest.mark.filterwarnings("ignore:latent larger than")  # layerwise: `gate` has 5
@pytest.mark.parametrize("strategy", ["single", "layerwise"])
def test_round_trip_is_bit_exact_in_a_fresh_process(
    net_module, tmp_path: Path, strategy: str
) -> None:
    mapped = trained(net_module, MappingConfig(latent_dim=6, strategy=strategy, seed=4))
    ckpt = mapnet.save(mapped, tmp_path / "run" / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_FILE, TENSOR_FILE]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = mapped(x).detach()

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import mapnet, netdef
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        mapped = mapnet.load({str(ckpt)!r}, netdef.Net()).eval()
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.save(mapped(x).detach(), {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    actual = torch.load(tmp_path / "out.pt")
    assert torch.equal(actual, expected)


def test_tensor_file_holds_latents_buffers_and_unregenerable_base_only(
    net_module, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    mapped = trained(net_module, MappingConfig(latent_dim=6))
    ckpt = mapnet.save(mapped, tmp_path / "ckpt")
    tensors = load_file(ckpt / TENSOR_FILE)
    assert sorted(tensors) == [
        "_extra_state",
        "base.gate",
        "latents.0",
        "target.bn.num_batches_tracked",
        "target.bn.running_mean",
        "target.bn.running_var",
    ]
    assert tensors["target.bn.num_batches_tracked"].item() == 3
    description = json.loads((ckpt / CONFIG_FILE).read_text())
    assert description["config"]["latent_dim"] == 6
    assert description["identity"]["groups"][0]["latent_dim"] == 6


def test_load_restores_running_stats(net_module, tmp_path: Path) -> None:
    mapped = trained(net_module, MappingConfig(latent_dim=6))
    ckpt = mapnet.save(mapped, tmp_path / "ckpt")
    again = mapnet.load(ckpt, net_module.Net())
    assert torch.equal(again.target.bn.running_mean, mapped.target.bn.running_mean)
    assert again.target.bn.num_batches_tracked.item() == 3


@pytest.fixture
def saved(net_module, tmp_path: Path) -> Path:
    return mapnet.save(trained(net_module, MappingConfig(latent_dim=6, seed=2)), tmp_path / "ck")


def test_truncated_tensor_file(saved: Path, net_module) -> None:
    data = (saved / TENSOR_FILE).read_bytes()
    (saved / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, edited or belongs to another save"):
        mapnet.load(saved, net_module.Net())


def test_edited_tensor_file(saved: Path, net_module) -> None:
    data = bytearray((saved / TENSOR_FILE).read_bytes())
    data[-3] ^= 0xFF
    (saved / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        mapnet.load(saved, net_module.Net())


def test_truncated_json(saved: Path, net_module) -> None:
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[:100])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mapnet.load(saved, net_module.Net())


def test_seed_edited_in_json(saved: Path, net_module) -> None:
    description = json.loads((saved / CONFIG_FILE).read_text())
    description["config"]["seed"] = 3
    (saved / CONFIG_FILE).write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=r"another MappingConfig \(seed: saved 2, here 3\)"):
        mapnet.load(saved, net_module.Net())


def test_different_architecture(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="does not generate"):
        mapnet.load(saved, nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 2)))


def test_same_layers_different_shapes(net_module, tmp_path: Path) -> None:
    ckpt = mapnet.save(mapnet.wrap(nn.Linear(4, 3), MappingConfig(latent_dim=5)), tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"another architecture.*\['bias', 'weight'\]"):
        mapnet.load(ckpt, nn.Linear(3, 4))


def test_missing_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a mapnet checkpoint folder"):
        mapnet.load(tmp_path / "nowhere", nn.Linear(2, 2))
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="is not a mapnet-checkpoint description"):
        mapnet.load(tmp_path, nn.Linear(2, 2))


def test_base_model_checkpoint_requires_the_same_pretrained_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = nn.Linear(6, 4)
    mapped = mapnet.wrap(pretrained, MappingConfig(latent_dim=5, base="model"))
    ckpt = mapnet.save(mapped, tmp_path / "ft")
    again = mapnet.load(ckpt, pretrained)
    x = torch.randn(2, 6)
    assert torch.equal(again(x), mapped(x))
    with pytest.raises(CheckpointError, match="pretrained weights"):
        mapnet.load(ckpt, nn.Linear(6, 4))


def test_save_replaces_atomically(net_module, tmp_path: Path) -> None:
    mapped = trained(net_module, MappingConfig(latent_dim=6))
    ckpt = mapnet.save(mapped, tmp_path / "ckpt")
    mapnet.save(mapped, ckpt)  # overwrite in place
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_FILE, TENSOR_FILE]  # no temp files
    mapnet.load(ckpt, net_module.Net())
