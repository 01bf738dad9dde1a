from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mapnet
from interrupts import killed_at_call
from mapnet import files
from mapnet.checkpoint import CONFIG_FILE, TENSOR_FILE
from mapnet.compress import quantize_int8, save_quantized
from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.export import export_safetensors

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
def test_round_trip_is_bit_exact_in_a_fresh_process(net_module, tmp_path: Path) -> None:
    """Both strategies' checkpoints, loaded in one fresh interpreter (its startup is most of the
    time), each into a net built there under another seed."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    checkpoints, expected = {}, {}
    for strategy in ("single", "layerwise"):
        mapped = trained(net_module, MappingConfig(latent_dim=6, strategy=strategy, seed=4))
        ckpt = mapnet.save(mapped, tmp_path / strategy / "ckpt")
        assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_FILE, TENSOR_FILE]
        checkpoints[strategy] = str(ckpt)
        expected[strategy] = mapped(x).detach()

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import mapnet, netdef
        outputs = {{}}
        for strategy, ckpt in {checkpoints!r}.items():
            torch.manual_seed(123)  # a different init: everything must come from the checkpoint
            mapped = mapnet.load(ckpt, netdef.Net()).eval()
            x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
            outputs[strategy] = mapped(x).detach()
        torch.save(outputs, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    actual = torch.load(tmp_path / "out.pt")
    assert sorted(actual) == sorted(expected)
    for strategy, want in expected.items():
        assert torch.equal(actual[strategy], want), strategy


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
    with pytest.raises(
        CheckpointError, match=rf"tensors\.safetensors has {len(data) // 2} bytes, mapnet\.json"
    ):
        mapnet.load(saved, net_module.Net())


def test_edited_tensor_file(saved: Path, net_module) -> None:
    data = bytearray((saved / TENSOR_FILE).read_bytes())
    data[-3] ^= 0xFF
    (saved / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"tensors\.safetensors does not match the checksum in mapnet\.json"
    ):
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
    with pytest.raises(CheckpointError, match=r"another architecture: .*'0\.bias', '0\.weight'"):
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


def test_a_save_lists_the_tensor_file_with_its_size_and_sha256(net_module, tmp_path: Path) -> None:
    ckpt = mapnet.save(trained(net_module, MappingConfig(latent_dim=6)), tmp_path / "ckpt")
    description = json.loads((ckpt / CONFIG_FILE).read_text())
    blob = (ckpt / TENSOR_FILE).read_bytes()
    assert description["version"] == 3
    assert description["files"] == {
        TENSOR_FILE: {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    }


def test_a_format_2_folder_still_loads(net_module, tmp_path: Path) -> None:
    mapped = trained(net_module, MappingConfig(latent_dim=6))
    ckpt = mapnet.save(mapped, tmp_path / "ckpt")
    description = json.loads((ckpt / CONFIG_FILE).read_text())
    del description["files"]
    blob = (ckpt / TENSOR_FILE).read_bytes()
    description |= {"version": 2, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    (ckpt / CONFIG_FILE).write_text(json.dumps(description, indent=2))
    (ckpt / "notes.txt").write_text("format 2 never listed its files")
    again = mapnet.load(ckpt, net_module.Net())
    assert torch.equal(again.latent, mapped.latent)
    (ckpt / TENSOR_FILE).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        mapnet.load(ckpt, net_module.Net())
    description["version"] = 3  # format 3 without its files table: refused
    (ckpt / CONFIG_FILE).write_text(json.dumps(description, indent=2))
    with pytest.raises(CheckpointError, match="has no 'files' table"):
        mapnet.load(ckpt, net_module.Net())


def linear_at(value: float) -> mapnet.MappedModule:
    mapped = mapnet.wrap(nn.Linear(3, 2), MappingConfig(latent_dim=4, seed=1))
    with torch.no_grad():
        mapped.latent.fill_(value)
    return mapped


def latent_in(folder: Path) -> float:
    loaded = mapnet.load(folder, nn.Linear(3, 2)).latent
    assert len(set(loaded.tolist())) == 1
    return loaded[0].item()


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_kill_at_any_step_of_a_save_leaves_the_previous_or_the_new_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """Killed before or after every fsync, rename, exchange and removal of a save, the folder
    loads as the previous checkpoint or the new one, and the next save cleans up."""
    if swap == "two renames":  # as on a system without RENAME_EXCHANGE
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    # A kill, not a power cut: fsync need not reach the disk here, only count as a step.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    steps = [(os, "fsync"), (os, "rename"), (os, "replace"), (os, "unlink")]
    steps += [(files, "_exchange"), (shutil, "rmtree")]
    ckpt, old, new = tmp_path / "ckpt", linear_at(1.0), linear_at(2.0)
    seen = set()
    for n in range(1, 100):
        for after in (False, True):
            mapnet.save(old, ckpt)
            if not killed_at_call(lambda: mapnet.save(new, ckpt), steps, n, after=after):
                break
            seen.add(latent_in(ckpt))
            mapnet.save(linear_at(3.0), ckpt)
            assert latent_in(ckpt) == 3.0
            assert os.listdir(tmp_path) == ["ckpt"]
        else:
            continue
        break
    assert seen == {1.0, 2.0}


def test_two_processes_saving_to_one_folder_leave_one_loadable_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"

    def save_repeatedly(value: float) -> None:
        mapped = linear_at(value)
        for _ in range(15):
            mapnet.save(mapped, ckpt)

    writers = []
    for value in (1.0, 2.0):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                save_repeatedly(value)
            finally:
                os._exit(0 if sys.exc_info()[0] is None else 1)
        writers.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in writers]
    assert codes == [0, 0]  # the second writer of each save waited for the first
    assert latent_in(ckpt) in (1.0, 2.0)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_save_while_another_process_holds_the_folder_names_it_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, report = mapnet.save(linear_at(1.0), tmp_path / "ckpt"), tmp_path / "report.txt"
    monkeypatch.setattr(files, "COMMIT_LOCK_TIMEOUT", 0.2)  # the forked writer's wait

    def second_writer() -> None:
        try:
            mapnet.save(linear_at(2.0), ckpt)
        except files.InUseError as error:
            report.write_text(str(error))

    with files.lock(ckpt):
        assert not killed_at_call(second_writer, [], 1)
    assert report.read_text().startswith(f"{ckpt} is in use by pid {os.getpid()}: ")
    assert latent_in(ckpt) == 1.0


def test_save_refuses_non_finite_latents_that_load_would_refuse_unless_allowed(
    tmp_path: Path,
) -> None:
    diverged = linear_at(float("nan"))
    with pytest.raises(ValueError, match=r"\['latents\.0'\] hold NaN/inf .* allow_nonfinite"):
        mapnet.save(diverged, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    mapnet.save(diverged, tmp_path / "ckpt", allow_nonfinite=True)  # for a post-mortem
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN/inf\) in \['latents\.0'\]"):
        mapnet.load(tmp_path / "ckpt", nn.Linear(3, 2))


def _space_save(path: Path) -> None:
    config = MappingConfig(latent_dim=4, seed=1)
    mapnet.ModelSpace(lambda: nn.Linear(3, 2), config, n=2).save(path)


@functools.cache
def _tiny_int8() -> nn.Module:
    return quantize_int8(nn.Sequential(nn.Linear(3, 2)).eval(), [torch.randn(2, 3)])


def _int8_save(path: Path) -> None:
    save_quantized(_tiny_int8(), path)


WRITERS: dict[str, Callable[[Path], object]] = {
    "mapnet.save": lambda path: mapnet.save(linear_at(2.0), path),
    "ModelSpace.save": _space_save,
    "save_quantized": _int8_save,
    "export_safetensors": lambda path: export_safetensors(linear_at(2.0), path),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_waits_for_the_lock_of_its_target_then_names_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target, report = tmp_path / "target", tmp_path / "report.txt"
    monkeypatch.setattr(files, "COMMIT_LOCK_TIMEOUT", 0.2)  # the forked writer's wait
    _tiny_int8()  # built once, before the fork

    def second_writer() -> None:
        try:
            WRITERS[writer](target)
        except files.InUseError as error:
            report.write_text(str(error))

    with files.lock(target):
        assert not killed_at_call(second_writer, [], 1)
    assert report.read_text().startswith(f"{target} is in use by pid {os.getpid()}: ")
    assert not target.exists()
    WRITERS[writer](target)  # free again
    assert target.exists()
