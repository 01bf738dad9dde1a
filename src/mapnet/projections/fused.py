"""The structured projection's passes as the generator runs them: compiled to C++ by inductor,
torch.compile's CPU backend, where a C++ compiler is present and a group is large enough, eager
(`StructuredProjection`'s own passes) otherwise.

What is compiled, per pass (a group's (n, B) buffer at once, or in column chunks of about
`_CHUNK_BYTES` when larger: a kernel keeps every level's result, chunks bound that memory):

    forward   gather [u, −u, 0] into the slots, the Walsh–Hadamard butterflies, the per-row
              gain (or the signs and one gain), + θ₀ when the buffer is one chunk
    adjoint   (g ⊙ w) · gain into the buffer and the butterflies when it is one chunk, else
              the butterflies only; the scatter back to the d inputs stays eager (compiled for
              several threads it would add in another order at every thread count)

The butterflies run radix 4: two radix-2 levels per loop, (a, b, c, d) ->
((a+b)+(c+d), (a−b)+(c−d), (a+b)−(c+d), (a−b)−(c−d)), exactly the additions of `fwht` in its
order, and inductor multiplies and adds without contracting them into FMAs
(-ffp-contract=off), so a compiled pass gives the eager pass's bits: the same values, gradients
and thread-count independence (tests/test_fused.py). What it saves is memory traffic and
dispatch: the eager path sweeps the buffer once per level, one op each, the compiled one about
half as often, in one call.

Each kernel is traced once per argument signature (make_fx) and compiled by
`torch._inductor.compile`: dynamo's per-call guard checks would cost about a tenth of a
millisecond, the size of a small model's whole pass. Mode: `set_fusion("auto" | "compiled" |
"eager")` or $MAPNET_FUSION. "auto" (the default) compiles groups of at least `AUTO_MIN_ROWS`
rows when a C++ compiler is found: below that a pass is too short for the compile (seconds,
once per size; inductor caches it on disk) to matter or pay back, and small models and tests
never start a compiler. The measurements behind it are in docs/results/bench.md. The choice is
said once per process (`GenerationNotice`). Under torch.compile of the caller, torch.func
transforms or forward-mode AD, and off the CPU, the eager pass runs (the caller's compiler
traces it, or the transform wraps it).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mapnet.projections.protocol import Pieces, PieceWeights
from mapnet.projections.structured import StructuredProjection

MODES = ("auto", "compiled", "eager")
MODE_VARIABLE = "MAPNET_FUSION"
# "auto" compiles groups of at least this many rows (see the module docstring).
AUTO_MIN_ROWS = 1 << 16
# Bytes of the (n, B) buffer a compiled kernel takes at once (a column chunk): the kernel
# keeps every level's result, so chunks bound that memory (and keep it in cache). Widths are
# multiples of the vector length.
_CHUNK_BYTES = 1 << 22
_VECTOR = 8


class GenerationNotice(UserWarning):
    """Says once per process which path generates the weights and why."""


_mode: str | None = None  # set_fusion's; None: $MAPNET_FUSION, else "auto"
_noticed = False
# The compiled kernels by kind and argument signature, and the signatures that failed.
_compiled: dict[tuple, Callable[..., torch.Tensor]] = {}
_failed: set[tuple] = set()
_OPTIONS = {"assert_indirect_indexing": False}  # the slot tables are checked when built


def set_fusion(mode: str | None) -> None:
    """Choose how generation runs: "compiled", "eager" or "auto"; None: $MAPNET_FUSION again."""
    global _mode, _noticed
    if mode is not None and mode not in MODES:
        raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}")
    _mode, _noticed = mode, False


def fusion_mode() -> str:
    """The mode in force: set_fusion's, else $MAPNET_FUSION's, else "auto"."""
    if _mode is not None:
        return _mode
    mode = os.environ.get(MODE_VARIABLE, "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"${MODE_VARIABLE}={mode!r} is not one of {MODES}")
    return mode


@functools.cache
def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would run ($CXX, else c++, g++, clang++ on
    the PATH), or None; None too where dynamo does not run (its Python version). Looked up
    once, never run."""
    if not torch._dynamo.is_dynamo_supported():
        return None
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    return None


def _notice(message: str) -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        warnings.warn(f"mapnet: {message}", GenerationNotice, stacklevel=4)


def compiles(projection: Any, u: torch.Tensor) -> bool:
    """Whether the passes of `projection` for `u` run compiled (says why, once per process)."""
    mode = fusion_mode()
    if mode == "eager" or not isinstance(projection, StructuredProjection):
        return False
    if mode == "auto" and projection.out_features < AUTO_MIN_ROWS:
        return False
    if u.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    compiler = cpp_compiler()
    if compiler is None:
        _notice(
            "weights are generated by the eager passes: torch.compile needs a C++ compiler "
            f"(none found: $CXX, c++, g++, clang++); ${MODE_VARIABLE}=eager says so quietly"
        )
        return False
    _notice(
        f"weight generation is compiled by torch.compile ({compiler}); the first step at each "
        f"new size compiles it, seconds once per machine (cached), then each step is faster; "
        f"${MODE_VARIABLE}=eager skips compiling"
    )
    return True


def _chunks(projection: StructuredProjection) -> list[tuple[int, int, int]]:
    """Column ranges (lo, hi, keep) of the (n, B) buffer the compiled kernels take one at a
    time, about `_CHUNK_BYTES` each; all of one width (one compiled shape), so the last starts
    early and only its columns from `keep` are new (the columns, one per block, are transformed
    independently)."""
    blocks = projection.blocks
    width = max(_VECTOR, _CHUNK_BYTES // (4 * projection.n) // _VECTOR * _VECTOR)
    if width >= blocks:
        return [(0, blocks, 0)]
    count = -(-blocks // width)
    width = -(-blocks // count)  # as even as the count allows
    starts = [min(i * width, blocks - width) for i in range(count)]
    return [(lo, lo + width, max(lo, i * width)) for i, lo in enumerate(starts)]


def matvec(projection: Any, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """(d,) -> (P,): θ₀ + row_scale ⊙ (W u), `projection._matvec`'s values and bits."""
    if u.dim() != 1 or not compiles(projection, u):
        return projection._matvec(u, offset)
    n, blocks, rows = projection.n, projection.blocks, projection.out_features
    signed = torch.cat([u, -u, u.new_zeros(1)])  # (2d + 1,)
    sources = projection.sources.view(n, blocks)
    segments = projection._segments
    # One gain for every row (a multiplicative update's): in the kernel, after the signs.
    value = None if segments is None or len(segments) > 1 else u.new_tensor(segments[0][2])
    if projection.gain is not None:
        scale, function, name = projection.gain.to(u.dtype), _forward_with_gain, "forward-gain"
        extra: tuple = ()
    else:
        scale, function, name = projection.signs, _forward_with_signs, "forward-signs"
        extra = (value,)
    scale = scale.view(n, blocks)
    chunks = _chunks(projection)
    if len(chunks) == 1 and projection.gain is not None:  # the whole pass, θ₀ added in it
        args = (signed, sources, scale, offset)
        kernel = _kernel("forward-gain-offset", args, _forward_with_gain_and_offset)
        if kernel is None:
            return projection._matvec(u, offset)
        return kernel(*args)[:rows]
    if len(chunks) == 1:
        args = (signed, sources, scale, *extra)
        kernel = _kernel(name, args, function)
        if kernel is None:
            return projection._matvec(u, offset)
        out = kernel(*args)  # (n, B): output order
    else:
        out = u.new_empty(n, blocks)
        for lo, hi, keep in chunks:
            args = (signed, sources[:, lo:hi], scale[:, lo:hi], *extra)
            kernel = _kernel(name, args, function)
            if kernel is None:  # only at the first chunk: they share one shape
                return projection._matvec(u, offset)
            out[:, keep:hi] = kernel(*args)[:, keep - lo :]
    flat = out.view(-1)
    if projection.gain is None and value is None:  # (y·t)·c: each segment's gain, as eager
        for a, b, gain in segments:
            flat[a:b] *= gain
    if offset is not None:
        flat[:rows] += offset.to(u.dtype)
    return flat[:rows]


def rmatvec_pieces(
    projection: Any, pieces: Pieces, sizes: Sequence[int], weights: PieceWeights | None = None
) -> torch.Tensor:
    """Wᵀ (g ⊙ w) from g's pieces (1, k) (None: zeros): (1, d), `_rmatvec_pieces`' bits."""
    present = next(p for p in pieces if p is not None)
    if present.shape[0] != 1 or not compiles(projection, present):
        return projection._rmatvec_pieces(pieces, sizes, weights)
    chunks = _chunks(projection)
    if len(chunks) == 1 and projection.gain is not None and all(p is not None for p in pieces):
        # The whole pass but the scatter: (g ⊙ w) · gain into the buffer, then the transform.
        gain = projection.gain.to(present.dtype)
        args = (gain, list(pieces), None if weights is None else list(weights), projection.n)
        kernel = _kernel("adjoint-whole", args, _adjoint_whole)
        if kernel is not None:
            return projection._adjoint_output(kernel(*args).view(1, -1))
    lo, hi, _ = chunks[0]
    padded = projection._adjoint_input(pieces, sizes, weights)  # (1, Bn)
    blocks = padded.view(projection.n, projection.blocks)
    kernel = _kernel("adjoint", (blocks[:, lo:hi],), _butterflies)
    if kernel is None:
        return projection._rmatvec_pieces(pieces, sizes, weights)
    if len(chunks) == 1:
        return projection._adjoint_output(kernel(blocks).view(1, -1))
    for lo, hi, keep in chunks:  # in place, chunk by chunk: no second buffer
        blocks[:, keep:hi] = kernel(blocks[:, lo:hi])[:, keep - lo :]
    return projection._adjoint_output(padded)


def _kernel(name: str, args: tuple, function: Callable[..., Any]) -> Callable[..., Any] | None:
    """`function` compiled for these arguments: traced once into a graph (make_fx; a static
    graph, no guards, so the key here must hold everything it depends on: shapes, strides,
    dtypes, ints) and compiled by inductor, torch.compile's C++ backend, without dynamo's
    per-call guard checks (a tenth of a millisecond a call, the size of a small model's pass).
    None when compiling fails: the caller runs the eager pass (and it is said once)."""
    # The thread count too: inductor writes OpenMP loops only for more than one thread.
    key = (name, torch.get_num_threads(), tuple(_signature(a) for a in args))
    kernel = _compiled.get(key)
    if kernel is None and key not in _failed:
        try:
            kernel = _compile(function, args)
        except Exception as error:  # an inductor or compiler failure must not stop training
            _failed.add(key)
            _notice(
                f"compiling the generation pass failed ({type(error).__name__}: {error}); "
                "the eager pass runs instead"
            )
            return None
        _compiled[key] = kernel
    return kernel


def _compile(function: Callable[..., Any], args: tuple) -> Callable[..., Any]:
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    flat, spec = torch.utils._pytree.tree_flatten(args)
    tensors = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]

    def traced(*inputs: torch.Tensor) -> torch.Tensor:
        values = list(flat)
        for index, value in zip(tensors, inputs):
            values[index] = value
        return function(*torch.utils._pytree.tree_unflatten(values, spec))

    example = [flat[i] for i in tensors]
    graph = make_fx(traced)(*example)
    compiled = inductor_compile(graph, example, options=_OPTIONS)

    def run(*call_args: Any) -> torch.Tensor:
        inputs = [
            a for a in torch.utils._pytree.tree_leaves(call_args) if isinstance(a, torch.Tensor)
        ]
        out = compiled(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


def _signature(value: Any) -> Any:
    """What dynamo specialises a compiled graph on: tensors' shapes, strides and dtypes, the
    values of ints, and lists of those."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value


# ----------------------------------------------------------------- what torch.compile compiles


def _butterflies(x: torch.Tensor) -> torch.Tensor:
    """H x along dim 0 of x (n, T), n a power of two: `fwht`'s additions in its order, two
    levels (h, 2h) per radix-4 step, a last radix-2 level when log2(n) is odd."""
    n, trail = x.shape
    h = 1
    while h < n:
        if 4 * h <= n:
            a, b, c, d = x.reshape(n // (4 * h), 4, h, trail).unbind(1)
            s, t, p, q = a + b, a - b, c + d, c - d
            x = torch.stack([s + p, t + q, s - p, t - q], 1)
            h *= 4
        else:
            a, b = x.reshape(n // (2 * h), 2, h, trail).unbind(1)
            x = torch.stack([a + b, a - b], 1)
            h *= 2
    return x.reshape(n, trail)


def _forward_with_gain(
    signed: torch.Tensor, sources: torch.Tensor, gain: torch.Tensor
) -> torch.Tensor:
    """A column chunk of the forward: gather the slots from [u, −u, 0], transform, gain."""
    return _butterflies(signed[sources.long()]) * gain


def _forward_with_signs(
    signed: torch.Tensor, sources: torch.Tensor, signs: torch.Tensor, value: torch.Tensor | None
) -> torch.Tensor:
    """As `_forward_with_gain` with the int8 output signs, then the one gain of every row when
    there is one ((y·t)·c, the eager pass's order; several segments' gains come after)."""
    y = _butterflies(signed[sources.long()]) * signs.to(signed.dtype)
    return y if value is None else y * value


def _forward_with_gain_and_offset(
    signed: torch.Tensor, sources: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """The whole forward of a one-chunk projection: (P,), θ₀ added (two roundings, as eager)."""
    y = _forward_with_gain(signed, sources, gain).view(-1)
    if offset is None:
        return y[: gain.numel()]  # the caller slices to P
    return y[: offset.numel()] + offset


def _adjoint_whole(
    gain: torch.Tensor, pieces: list[torch.Tensor], weights: list[torch.Tensor] | None, n: int
) -> torch.Tensor:
    """The adjoint's buffer and transform for a one-chunk projection, from the pieces (1, k)
    and their weights (k,): (g ⊙ w) · gain, zero past P, transformed: (n, B)."""
    flat = torch.cat([p.reshape(-1) for p in pieces])  # (P,)
    if weights is not None:
        flat = flat * torch.cat(weights)
    flat = flat * gain[: flat.numel()]
    padded = torch.cat([flat, flat.new_zeros(gain.numel() - flat.numel())])  # (Bn,)
    return _butterflies(padded.view(n, -1))
