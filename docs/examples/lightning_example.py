# Lightning trains a mapped MLP through its latent (paper §2.2); the .ckpt is a torch.save.
import tempfile

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import mapnet


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        self.net = mapnet.wrap(mlp, latent_dim=16)  # the latent is its only parameter

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


data = DataLoader(TensorDataset(x := torch.randn(64, 8), (x[:, 0] > 0).long()), batch_size=16)
with tempfile.TemporaryDirectory() as folder:  # the default ModelCheckpoint writes here
    trainer = L.Trainer(max_steps=20, logger=False, accelerator="cpu", default_root_dir=folder)
    trainer.fit(model := Classifier(), data)  # torch >= 2.6 loads it with weights_only=True:
    again = Classifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    same = torch.equal(again.net(x), model.net(x))  # (no arbitrary unpickling)
print(f"{model.net.num_trainable_parameters()} trained numbers; reloaded outputs identical: {same}")
