"""Export a mapped network to ONNX and run it with onnxruntime (pip install 'mapnet[integrations]').
The file holds the weights the latent generates (paper §2.2): it runs without mapnet."""

import numpy as np
import onnxruntime
import torch
from torch import nn

import mapnet
from mapnet.export import export_onnx


def small_net() -> nn.Module:  # CNN2-like: two conv blocks, two linear layers, 1×28×28 inputs
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


mapped = mapnet.wrap(small_net, mapnet.MappingConfig(latent_dim=256))
with torch.no_grad():
    mapped.latent.normal_()  # stands in for a trained latent
x = torch.randn(4, 1, 28, 28)
report = export_onnx(mapped, x, "small_net.onnx")  # raises unless onnxruntime matches torch
session = onnxruntime.InferenceSession("small_net.onnx", providers=["CPUExecutionProvider"])
(logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
with torch.no_grad():
    error = np.abs(logits - mapped(x).numpy()).max()  # against the mapped model itself
print(f"opset {report.opset}: max abs error {error:.1e}, classes {logits.argmax(1).tolist()}")
