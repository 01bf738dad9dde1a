"""Export a mapped network as an ordinary one: the weights its latent generates (paper §2.2,
eq. 20–24) written out, so the file runs without mapnet, the projection or the seed.

    export_safetensors(mapped, "model.safetensors")   # the plain model's state dict
    export_onnx(mapped, x, "model.onnx")              # checked against torch with onnxruntime
    program = export_program(mapped, x)               # torch.export's ExportedProgram

Each takes a MappedModule (materialised first: `MappedModule.materialize()`), any module with a
`materialize()` method (`mapnet.compress.CompressedWeights`, which then exports the pruned or
rounded weights), or an ordinary nn.Module. Example inputs are a tensor or a tuple of tensors,
the forward's positional arguments; with `dynamic_batch` dim 0 of each is the batch.

ONNX needs `onnx`, `onnxscript` (torch's ONNX exporter) and, for the check, `onnxruntime`:
`pip install 'mapnet[integrations]'`.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import inspect
import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from mapnet import files
from mapnet._version import __version__
from mapnet.checkpoint import unshared_tensors
from mapnet.module import MappedModule

EXPORT_FORMAT = "mapnet-export"
EXPORT_VERSION = 1
# The key of the JSON description in a safetensors header and in an ONNX model's metadata_props.
METADATA_KEY = "mapnet_export"
# protobuf cannot serialise a message of 2 GiB or more: larger ONNX models keep their weights in
# a `<file>.data` beside the file (ONNX's external data). A margin for the graph itself.
ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**26
INSTALL_HINT = "pip install 'mapnet[integrations]'"

Inputs = torch.Tensor | Sequence[torch.Tensor]


class ExportError(RuntimeError):
    """The exporter could not export the model (the message says which and on what inputs)."""


class ExportCheckError(ExportError):
    """The exported model's outputs differ from torch's beyond the tolerance."""


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote and, with `check`, how closely onnxruntime reproduced torch.

    max_abs_error: the largest |onnxruntime − torch| over every output and checked batch (None
        without the check). argmax_mismatches: positions (samples, or pixels of a (B, C, H, W)
        output) whose argmax over dim 1 differs, for outputs with classes along dim 1."""

    path: Path
    opset: int
    dynamic_batch: bool
    max_abs_error: float | None = None
    argmax_mismatches: int | None = None
    checked_batch_sizes: tuple[int, ...] = ()


def _require(purpose: str, *packages: str) -> list[ModuleType]:
    """Import optional packages here, not at module import: mapnet itself needs none of them."""
    modules, missing = [], []
    for name in packages:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"{purpose} needs the package(s) {', '.join(missing)}: pip install "
            f"{' '.join(missing)}  (or {INSTALL_HINT})"
        )
    return modules


def _plain_model(source: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The ordinary module to export and the description stored with it."""
    if not isinstance(source, nn.Module):
        raise TypeError(
            f"export takes a MappedModule from mapnet.wrap() or an nn.Module, got "
            f"{type(source).__name__}"
        )
    materialize = getattr(source, "materialize", None)
    plain = materialize() if callable(materialize) else source
    if not isinstance(plain, nn.Module):
        raise TypeError(f"{type(source).__name__}.materialize() returned a {type(plain).__name__}")
    # Wrappers (CompressedWeights, the ablation variants) hold the MappedModule inside.
    mapped = next((m for m in source.modules() if isinstance(m, MappedModule)), None)
    description = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported_from": type(source).__name__,
        "model_class": f"{type(plain).__module__}.{type(plain).__qualname__}",
        "parameters": sum(p.numel() for p in plain.parameters()),
        "mapping": mapped.mapping_config.to_dict() if mapped is not None else None,
        "mapnet_version": __version__,
        "torch_version": torch.__version__,
    }
    return plain, description


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the export; a module the caller passed gets each submodule's mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _as_inputs(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise ValueError(
            "example_inputs must be a tensor or a non-empty tuple of tensors (the forward's "
            f"positional arguments), got {type(example_inputs).__name__}"
        )
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"example_inputs[{index}] is a {type(value).__name__}, not a tensor")
    return tuple(inputs)


def _shapes(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in inputs)


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer (in registration order) takes, for error messages."""
    signature = f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    for name, module in model.named_modules():
        if isinstance(module, (*convs, nn.ConvTranspose3d)):
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[len(module.kernel_size)]
            shape = f"(B, {module.in_channels}, {spatial})"
        elif isinstance(module, nn.Linear):
            shape = f"(..., {module.in_features})"
        elif isinstance(module, nn.RNNBase):
            shape = f"(B, T, {module.input_size})" if module.batch_first else "(T, B, F)"
        elif isinstance(module, nn.Embedding):
            shape = f"integer indices below {module.num_embeddings}"
        else:
            continue
        return f"{signature}; its first layer {name!r} ({type(module).__name__}) takes {shape}"
    return signature


def _run(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """The model's outputs on `inputs`; a wrong input is a ValueError saying what fits."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise ValueError(
            f"{type(model).__name__} does not run on example input(s) of shape "
            f"{_shapes(inputs)}: {error}. Expected: {_expected_input(model)}"
        ) from None


def _traced_inputs(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...] | None]:
    """The inputs to trace and torch.export's dynamic_shapes (one batch dim shared by all)."""
    if not dynamic_batch:
        return inputs, None
    if any(t.dim() == 0 for t in inputs):
        raise ValueError(
            "dynamic_batch needs dim 0 of every example input to be the batch; a 0-dim tensor "
            "has none: pass dynamic_batch=False"
        )
    sizes = {t.shape[0] for t in inputs}
    if len(sizes) > 1:
        raise ValueError(
            f"dynamic_batch: the example inputs' dim 0 differ ({_shapes(inputs)}); they must "
            "share the batch size, or pass dynamic_batch=False"
        )
    if sizes == {1}:
        # torch.export turns a dimension of size 1 into the constant 1 (0/1 specialisation):
        # traced at batch 1, the LSTM forecaster exports fixed to batch 1 without a word.
        inputs = tuple(torch.cat([t, t]) for t in inputs)
    batch = torch.export.Dim("batch")
    return inputs, tuple({0: batch} for _ in inputs)


def _file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{file} is a folder: give a file path, such as {file / 'model.onnx'}")
    return file


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    raise TypeError(
        f"the check compares tensor or tuple outputs, got a {type(output).__name__}: pass "
        "check=False"
    )


def export_safetensors(mapped_or_module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the materialised model's `state_dict()` (generated weights and buffers such as
    BatchNorm statistics) to the safetensors file `path` (atomically, under the file's lock:
    `mapnet.files.commit_file`; its folder is created).

    The header's metadata holds {"format": "pt", "mapnet_export": a JSON description}, readable
    with `read_export_metadata`. A fresh instance of the target loads it with
    `model.load_state_dict(safetensors.torch.load_file(path))` and computes what the mapped
    model computes. Returns the path."""
    file = _file(path)
    plain, description = _plain_model(mapped_or_module)
    state = plain.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{type(plain).__name__}'s state_dict entry {key!r} is a "
                f"{type(value).__name__}: safetensors holds tensors only"
            )
    tensors = unshared_tensors(state)  # load_state_dict copies the same values into both names
    # "format": "pt" is what Hugging Face tools read to recognise a torch safetensors file.
    metadata = {"format": "pt", METADATA_KEY: json.dumps(description)}
    files.commit_file(file, save_safetensors(tensors, metadata=metadata))
    return file


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description stored by `export_safetensors` or `export_onnx` (by the file's suffix)."""
    file = Path(path)
    if file.suffix == ".onnx":
        (onnx,) = _require("reading an ONNX file's metadata", "onnx")
        model = onnx.load(str(file), load_external_data=False)
        stored = {p.key: p.value for p in model.metadata_props}
    else:
        with safe_open(str(file), framework="pt") as handle:
            stored = handle.metadata() or {}
    if METADATA_KEY not in stored:
        raise ValueError(f"{file} holds no {METADATA_KEY!r} metadata: it is not a mapnet export")
    return json.loads(stored[METADATA_KEY])


def export_onnx(
    mapped_or_module: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
) -> OnnxExport:
    """Write the materialised model, in eval mode, as the ONNX file `path` (folder created).

    dynamic_batch: the file takes any batch size (dim 0 of every input), else only the
        example's shapes. A batch-1 example is traced as two copies of itself: torch.export
        would fix a dimension of size 1.
    check: run the model with onnxruntime on the example inputs (and, with dynamic_batch, on a
        batch one larger, a size the export never saw) and compare with torch: every output's
        shape, max |error| ≤ atol, and argmax over dim 1 for outputs with classes there, up to
        near-ties (top two within 2·atol, which rounding may swap). A failure raises
        ExportCheckError with the figures; the file is then not written (files of 2 GiB or
        more are checked as written, with their weights in `<path>.<random hex>.data`, a name
        of each export's own so that the file and its data are replaced as a pair).
    opset: the ONNX opset (default: the exporter's recommended one).

    The description of `read_export_metadata` goes into the model's metadata_props. Returns
    an OnnxExport: the path, the opset and the check's figures.
    """
    onnx, _ = _require("mapnet.export.export_onnx", "onnx", "onnxscript")
    if check:
        _require("export_onnx(check=True)", "onnxruntime")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    file = _file(path)
    plain, description = _plain_model(mapped_or_module)
    inputs = _as_inputs(example_inputs)
    with _eval_mode(plain):
        _run(plain, inputs)  # a wrong shape fails here, with a message naming what fits
        traced, dynamic_shapes = _traced_inputs(inputs, dynamic_batch)
        try:
            # dynamo=True (torch.export, then onnxscript's translation): the default since
            # torch 2.9 and the maintained exporter; the TorchScript one (dynamo=False) warns
            # that it is deprecated. On torch 2.13 it exports CNN1, CNN2, the LSTM forecaster
            # and the U-Net (BatchNorm, ConvTranspose2d) with a dynamic batch
            # (tests/test_export.py). Named, so a change of default cannot swap exporters.
            program = torch.onnx.export(
                plain,
                traced,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
        except Exception as error:
            hint = " (a model that fixes its batch size: pass dynamic_batch=False)"
            raise ExportError(
                f"torch.onnx.export failed for {type(plain).__name__} on inputs of shape "
                f"{_shapes(traced)}: {error}{hint if dynamic_batch else ''}"
            ) from error
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(description)})
        opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        result = OnnxExport(file, opset_used, dynamic_batch)
        state = plain.state_dict().values()
        weight_bytes = sum(t.nbytes for t in state if isinstance(t, torch.Tensor))
        if weight_bytes < ONNX_SINGLE_FILE_LIMIT:
            blob = proto.SerializeToString()
            if check:  # checked in memory: a file that fails the check is never written
                result = _check_onnx(blob, plain, inputs, dynamic_batch, atol, result)
            files.commit_file(file, blob)
        else:
            _save_with_external_data(onnx, proto, file)
            if check:
                result = _check_onnx(str(file), plain, inputs, dynamic_batch, atol, result)
    return result


def _save_with_external_data(onnx: ModuleType, proto: Any, file: Path) -> None:
    """Write an ONNX model whose weights lie in a data file beside it so that a writer killed
    at any instant leaves the previous pair or the new one: the data file is named for this
    export (`<file>.<random hex>.data`) and moved in first, then the ONNX file naming it
    replaces the old one in one rename, and the old data file is removed last. Under the
    file's lock, as every mapnet writer."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with files.lock(file, timeout=files.COMMIT_LOCK_TIMEOUT):
        files.recover(file)  # staging folders of a killed export
        data_name = f"{file.name}.{secrets.token_hex(4)}.data"
        staging = Path(tempfile.mkdtemp(dir=file.parent, prefix=files.staging_prefix(file)))
        try:
            onnx.save_model(
                proto,
                str(staging / file.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
            )
            files.fsync(staging / data_name)
            files.fsync(staging / file.name)
            os.rename(staging / data_name, file.parent / data_name)
            os.replace(staging / file.name, file)
            files.fsync(file.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for old in file.parent.glob(glob.escape(file.name) + "*.data"):
            if old.name != data_name:
                old.unlink()


def _check_onnx(
    model: bytes | str,
    plain: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dynamic_batch: bool,
    atol: float,
    result: OnnxExport,
) -> OnnxExport:
    """Compare onnxruntime's outputs with torch's; raise ExportCheckError past `atol`."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    batches = [inputs]
    if dynamic_batch:
        batches.append(tuple(torch.cat([t, t[:1]]) for t in inputs))
    worst, mismatches = 0.0, 0
    for batch in batches:
        size = batch[0].shape[0] if batch[0].dim() else 1
        where = f"{result.path} at batch size {size}"
        expected = [t.detach().cpu().numpy() for t in _output_tensors(_run(plain, batch))]
        if len(names) != len(batch):
            raise ExportCheckError(
                f"{where}: the ONNX graph takes {len(names)} input(s) {names}, the example "
                f"{len(batch)} (an input the model does not use is dropped by the exporter)"
            )
        try:
            got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, batch)})
        except Exception as error:  # onnxruntime's own exception types are not importable
            raise ExportCheckError(f"{where}: onnxruntime cannot run the export: {error}") from None
        if [a.shape for a in got] != [e.shape for e in expected]:
            raise ExportCheckError(
                f"{where}: onnxruntime's output shapes {[a.shape for a in got]} differ from "
                f"torch's {[e.shape for e in expected]}"
            )
        for ours, theirs in zip(expected, got):
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
            error = float(diff.max()) if diff.size else 0.0
            differing = decisive = 0
            if ours.ndim >= 2 and ours.shape[1] > 1 and np.issubdtype(ours.dtype, np.floating):
                chosen = theirs.argmax(1)
                differs = chosen != ours.argmax(1)
                # torch's margin between its top class and onnxruntime's choice
                margin = ours.max(1) - np.take_along_axis(ours, chosen[:, None], 1)[:, 0]
                differing = int(differs.sum())
                decisive = int((differs & (margin > 2 * atol)).sum())
            if not error <= atol or decisive:  # `not <=`: a NaN error fails too
                kept = "not written" if isinstance(model, bytes) else "written: do not use it"
                raise ExportCheckError(
                    f"{where}: onnxruntime differs from torch: max abs error {error:.3g} "
                    f"(atol {atol:g}); argmax differs at {differing} position(s), {decisive} "
                    f"of them beyond a near-tie. The file was {kept}"
                )
            worst = max(worst, error)
            mismatches += differing
    sizes = tuple(b[0].shape[0] if b[0].dim() else 1 for b in batches)
    return OnnxExport(result.path, result.opset, result.dynamic_batch, worst, mismatches, sizes)


def export_program(
    mapped_or_module: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str] | None = None,
    *,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """`torch.export.export` of the materialised model in eval mode: its graph and generated
    weights as an ExportedProgram (`.module()` runs it; AOTInductor and ExecuTorch take it).

    path: also save it there with `torch.export.save` (a .pt2 zip archive; folder created).
        Off by default because that archive holds pickled data (the sample inputs, some
        tensors) and `torch.export.load` unpickles it: load only files you made yourself, and
        expect a file to need the torch version that wrote it. The pickle-free exports are
        `export_safetensors` and `export_onnx`.
    """
    plain, _ = _plain_model(mapped_or_module)
    inputs = _as_inputs(example_inputs)
    file = None if path is None else _file(path)
    with _eval_mode(plain):
        _run(plain, inputs)
        traced, dynamic_shapes = _traced_inputs(inputs, dynamic_batch)
        try:
            program = torch.export.export(plain, traced, dynamic_shapes=dynamic_shapes)
        except Exception as error:  # torch.export raises many types (UserError, Unsupported…)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportError(
                f"torch.export.export failed for {type(plain).__name__} on inputs of shape "
                f"{_shapes(traced)}: {first}"
                + (
                    " (a model that fixes its batch size: dynamic_batch=False)"
                    if dynamic_batch
                    else ""
                )
            ) from error
    if file is not None:
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        files.commit_file(file, buffer.getvalue())
    return program
