"""A PyTorch Lightning module around a mapped MLP (tests/test_integrations.py), and the fresh
process that reloads its Lightning checkpoint:

    python tests/lightning_worker.py CKPT INPUTS OUT

reads the checkpoint twice, with `weights_only=True` both times: through Lightning
(`MappedClassifier.load_from_checkpoint`) and as a plain state dict put into a new
`mapnet.wrap(...)` with strict checks. Writes both models' outputs on INPUTS["x"] to OUT
(safetensors, keys "lightning" and "plain").
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mapnet


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def mapped_mlp(latent_dim: int, seed: int) -> mapnet.MappedModule:
    return mapnet.wrap(mlp, mapnet.MappingConfig(latent_dim=latent_dim, seed=seed))


class MappedClassifier(L.LightningModule):
    """Hyperparameters are plain numbers: Lightning stores them in the checkpoint, and a
    MappingConfig object there would not load with weights_only=True (not an allowed global)."""

    def __init__(self, latent_dim: int = 16, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mapped_mlp(latent_dim, seed)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in 8 dimensions, labelled by the sign of their first coordinate."""
    x = torch.randn(count, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] > 0).long()


def main(checkpoint: str, inputs: str, out: str) -> None:
    x = load_file(inputs)["x"]
    lit = MappedClassifier.load_from_checkpoint(checkpoint, weights_only=True).eval()
    state = torch.load(checkpoint, weights_only=True)
    plain = mapped_mlp(**{k: state["hyper_parameters"][k] for k in ("latent_dim", "seed")})
    prefix = "net."
    plain.load_state_dict({k.removeprefix(prefix): v for k, v in state["state_dict"].items()})
    with torch.no_grad():
        save_file({"lightning": lit(x), "plain": plain.eval()(x)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
