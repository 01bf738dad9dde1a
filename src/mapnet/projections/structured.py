"""A structured fixed projection: W u in O(P log d) time and O(P) bytes, without a P×d matrix.

Construction (all integers come from a seeded counter hash, see "Reproducibility" below):

    n = 2^k ≥ d           Walsh–Hadamard size; H ∈ {±1}^{n×n} (Sylvester order), H Hᵀ = n I
    B = ⌈P / n⌉           number of blocks
    block j (0 ≤ j < B):  x_j = S_j u        u_i goes, times a random sign s_j[i], to a random
                                            slot σ_j(i) of n (σ_j injective; other slots 0)
                          y_j = H x_j        fast Walsh–Hadamard transform, exact ±1 arithmetic
    interleave:           row a of block j becomes output p = a·B + j; outputs p ≥ P are dropped
    output:               (W u)_p = row_scale_p · t_p · y_{p mod B}[p div B] / √max(P, d)
                          t_p a random output sign

So W = diag(row_scale) · (1/√max(P, d)) · M[:P, :d], where M ∈ {±1}^{Bn × n} is a row permutation
of the stack [T_j H S̃_j]_j of B signed, permuted Hadamard matrices (S̃_j the full n×n signed
permutation that S_j is the first d columns of). Each block H S̃_j / √n is exactly orthogonal, so
Mᵀ M = B n I. What holds exactly (with row_scale = 1):

* Every entry has the same magnitude: |W_pi| = 1 / √max(P, d).
* P ≥ d: every column has unit norm exactly. WᵀW = I exactly when P is a multiple of n (nothing
  dropped). Otherwise WᵀW = (Bn·I − Rᵀ R) / P, R ∈ {±1}^{(Bn−P)×d} the dropped rows of M
  (diag(RᵀR) = Bn − P, so the diagonal is still 1): the off-diagonal entries satisfy
  |(WᵀW)_ik| ≤ (Bn − P)/P < n/P (typically ~√(Bn−P)/P), and all singular values are ≤ √(Bn/P).
  Exact orthonormality for every P is impossible with equal-magnitude entries (two ±1 columns of
  odd length cannot be orthogonal).
* P < d (then B = 1): every row has unit norm exactly, and W Wᵀ = I exactly when d = n.

Why a single Hadamard per block (not Fastfood's H D Π H D): equal-magnitude entries make the exact
Jacobian norm of the mapping loss closed form (`weighted_row_sq_norms`), and one transform is half
the work. Why the interleave and the output signs: a block maps u isometrically (‖y_j‖ = √n ‖u‖
for every u), so contiguous blocks would force every run of n consecutive parameters to move by
the same norm; interleaving spreads each block over the whole vector (every layer gets rows from
every block), and t_p stops a column from being a plain Walsh pattern (e.g. a constant shift of
a whole weight matrix). The input signs s_j stop the Walsh "bucket collisions" of columns within a
layer from adding up with the same sign across blocks.

Reproducibility: slots, input signs and output signs come from splitmix64 on uint64 counters
(NumPy's uint64 arithmetic wraps modulo 2^64 by definition) keyed by SHA-256 of the seed, and
slots from sorting distinct integer keys, so W is bit-identical everywhere. The forward uses only
a gather (every slot reads +u_i, −u_i or 0), butterflies of exact ±1 additions in a fixed order,
one final multiplication and the optional offset's addition: never a BLAS call or a library
reduction, so W u is bit-identical for any thread count, process or machine with IEEE floats.
The transpose sums over blocks with `scatter_add_`, which on CPU adds in index order (a serial
loop per row), so Wᵀ g does not depend on the thread count either (both are tested).

Memory: one table, `sources` (n, B): for slot a of block j, the index into [u, −u, 0] it
gathers (int16 while 2d + 1 < 32768, else int32), 2 bytes per (block, slot); and the per-row
gain (row_scale folded with t_p and the normalisation, float32), 4. So 6·Bn ≤ 6(P + n) bytes in
all (8·Bn past d = 16383, where the index needs int32). A gain constant per tensor
(PiecewiseScale, what mapnet.wrap builds) over more than 2^22 rows is kept as int8 signs t_p
and one float per tensor instead: 3·Bn. Autograd saves nothing: the backward is the transposed
pass; transforms of at least 2^22 numbers run in place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mapnet.checks import positive_int
from mapnet.projections.protocol import Pieces, PieceWeights, PiecewiseScale, RowScale
from mapnet.projections.seeding import hash64, hash_signs, stream_key

# Index elements per scatter/gather call: bounds the transient int64 copy of the slot table.
_INDEX_CHUNK = 1 << 20
# Rows per construction step: its hash, sort and int64 temporaries stay near a megabyte, so
# building W costs its tables and little more (the wrap() memory target).
_BUILD_CHUNK = 1 << 16
# Transforms of at least this many numbers run in place (fwht); the staging buffer's size.
_IN_PLACE_MIN = 1 << 22
_IN_PLACE_CHUNK = 1 << 18
# Up to this many rows a PiecewiseScale is kept as one float per row (the fastest pass); past it,
# as int8 signs and one float per segment (3 instead of 6 bytes per parameter in all).
PER_ROW_GAIN_MAX = 1 << 22


def _slot_rows(key: int, j0: int, j1: int, n: int, d: int) -> torch.Tensor:
    """σ_j(i) for blocks j0 ≤ j < j1 and every input i: the first d entries of a random
    permutation of n. (j1 - j0, d) int64.

    The permutation sorts n keys whose high bits are hashed and whose low log2(n) bits are the slot
    itself, so keys are distinct and the sorted order (hence W) does not depend on the sort
    algorithm.
    """
    k = n.bit_length() - 1
    keys = hash64(key, j0 * n, j1 * n).reshape(j1 - j0, n)  # (b, n)
    keys >>= np.uint64(k + 1)  # keep 63 - k hash bits: the key fits a non-negative int64
    keys <<= np.uint64(k)
    keys |= np.arange(n, dtype=np.uint64)
    return torch.sort(torch.from_numpy(keys.view(np.int64)), dim=1).indices[:, :d]  # (b, d)


def _sources(seed: int, blocks: int, n: int, d: int) -> torch.Tensor:
    """The scatter S_j of every block as a gather table: (n, B), entry [a, j] = which element of
    [u, −u, 0] lands in slot a of block j (i for +u_i, d + i for −u_i, 2d for an empty slot).

    Built block-chunk by block-chunk (slots σ_j and input signs s_j of a chunk at a time), so no
    (B, d) table of either exists at once. Stored in the (n, B) layout the passes use, so the
    forward reads it in order and gathers from the small vector [u, −u, 0]. int16 when 2d + 1
    fits, else int32.
    """
    slot_key, sign_key = stream_key(seed, "slots"), stream_key(seed, "input_signs")
    dtype = torch.int16 if 2 * d < 1 << 15 else torch.int32
    sources = torch.full((n, blocks), 2 * d, dtype=dtype)
    step = max(1, _BUILD_CHUNK // n)  # chunks of blocks bound the hash and int64 temporaries
    for j0 in range(0, blocks, step):
        j1 = min(blocks, j0 + step)
        rows = _slot_rows(slot_key, j0, j1, n, d)  # (b, d)
        columns = torch.arange(j0, j1)[:, None].expand_as(rows)  # (b, d)
        negative = (hash_signs(sign_key, j0 * d, j1 * d).view(j1 - j0, d) < 0).to(dtype)
        sources[rows, columns] = torch.arange(d, dtype=dtype) + d * negative
    return sources


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along `dim` (length a power of two): H x.

    H is symmetric with H H = n I, so this is also its own transpose (and inverse up to 1/n).
    log2(n) radix-2 butterfly passes (a, b) -> (a + b, a - b): O(n log n) work, exact order of
    operations, no BLAS. Each pass is one `addcmul(a, [1, -1], b)` over both halves (a + (±1)·b is
    exactly a ± b in IEEE arithmetic, fused or not), one kernel instead of an add and a subtract.
    The axes after `dim` ride along inside every butterfly, so a transform along a leading axis
    of (n, T) runs on contiguous runs of h·T numbers, not of h (several times faster for h < 8).
    Consumes `x` (used as a work buffer).
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    trail = math.prod(x.shape[dim + 1 :])
    lead = x.numel() // (n * trail)
    src = x.reshape(lead, n, trail).contiguous()  # (L, n, T)
    if src.numel() >= _IN_PLACE_MIN:
        return _butterflies_in_place(src).view(x.shape)
    dst = torch.empty_like(src)
    plus_minus = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).view(1, 1, 2, 1)
    # Views by as_strided from precomputed strides: one call each, where view + slice took three
    # (a pass on a small transform costs ~5 µs instead of ~15 µs of Python-side overhead).
    # Under torch.compile the same arithmetic with view + slice (storage_offset() breaks graphs).
    compiling = torch.compiler.is_compiling()
    h = 1
    while h < n:
        run = h * trail  # (c, c + h) inside every 2h-run, as blocks of h·T numbers
        if compiling:
            pairs = src.view(lead, n // (2 * h), 2, run)
            a, b = pairs[:, :, :1], pairs[:, :, 1:]
            out = dst.view(lead, n // (2 * h), 2, run)
        else:
            size, stride = (lead, n // (2 * h), 1, run), (n * trail, 2 * run, run, 1)
            a = src.as_strided(size, stride)  # keeps src's storage offset
            b = src.as_strided(size, stride, src.storage_offset() + run)
            out = dst.as_strided((lead, n // (2 * h), 2, run), stride)
        torch.addcmul(a, plus_minus, b, out=out)
        src, dst = dst, src
        h *= 2
    return src.view(x.shape)


def _butterflies_in_place(x: torch.Tensor) -> torch.Tensor:
    """fwht of x (L, n, T) in its own storage: the same a + b and a − b per butterfly (same bits),
    with a − b staged through a small buffer instead of a second x-sized one. For large
    transforms, where the second buffer is a real share of a training step's memory; the chunk
    loop's Python overhead is noise there."""
    lead, n, trail = x.shape
    staging = x.new_empty(_IN_PLACE_CHUNK)
    h = 1
    while h < n:
        run = h * trail
        pairs = x.view(lead * (n // (2 * h)), 2, run)  # rows of (a, b) runs
        rows_per_chunk = max(1, _IN_PLACE_CHUNK // run)
        columns = min(run, _IN_PLACE_CHUNK)
        for r0 in range(0, pairs.shape[0], rows_per_chunk):
            r1 = min(pairs.shape[0], r0 + rows_per_chunk)
            for c0 in range(0, run, columns):
                c1 = min(run, c0 + columns)
                a, b = pairs[r0:r1, 0, c0:c1], pairs[r0:r1, 1, c0:c1]
                difference = staging[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.sub(a, b, out=difference)
                a.add_(b)
                b.copy_(difference)
        h *= 2
    return x


class _ProjectCore(torch.autograd.Function):
    """(u (..., d), offset (P,) or None) -> offset + W u (..., P); the backward is the transposed
    pass, so nothing is saved. The offset (θ₀) is added into the pass's own output buffer: no
    second P-sized tensor and no extra autograd node per step."""

    @staticmethod
    def forward(
        u: torch.Tensor, projection: StructuredProjection, offset: torch.Tensor | None
    ) -> torch.Tensor:
        # The result is a slice of the pass's (N, Bn) buffer; detach() makes it a plain tensor
        # on the same storage (no copy), so forward-mode AD does not treat it as a view.
        return projection._matvec(u, offset).detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.projection = inputs[1]
        ctx.offset_shape = None if inputs[2] is None else inputs[2].shape
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, Any]:
        needs = ctx.needs_input_grad
        grad_u = _adjoint_function().apply(grad, ctx.projection) if needs[0] else None
        grad_offset = grad.sum_to_size(ctx.offset_shape) if needs[2] else None
        return grad_u, None, grad_offset


class _Project(_ProjectCore):
    """_ProjectCore with forward-mode AD and vmap rules (torch.compile cannot trace those)."""

    @staticmethod
    def jvp(ctx: Any, tangent: Any, _: None, offset_tangent: Any) -> torch.Tensor:
        # Linear in both inputs; either tangent may be absent (forward AD of one input only).
        if tangent is None:
            return offset_tangent.expand(ctx.output_shape).clone()
        out = _Project.apply(tangent, ctx.projection, None)  # vmap-aware: jacfwd batches this
        return out if offset_tangent is None else out + offset_tangent

    @staticmethod
    def vmap(info: Any, in_dims: tuple, u: torch.Tensor, projection: object, offset: Any) -> tuple:
        # The pass already takes leading batch axes, so vmap only has to put them in front.
        u_dim, _, offset_dim = in_dims
        if u_dim is not None:
            u = u.movedim(u_dim, 0)
        if offset_dim is not None:
            offset = offset.movedim(offset_dim, 0)
            if u_dim is None:
                u = u.expand(info.batch_size, *u.shape)
        batched = u_dim is not None or offset_dim is not None
        return _Project.apply(u, projection, offset), 0 if batched else None


class _ProjectAdjointCore(torch.autograd.Function):
    """g (..., P) -> Wᵀ g (..., d); its backward is the forward pass (double backward works)."""

    @staticmethod
    def forward(g: torch.Tensor, projection: StructuredProjection) -> torch.Tensor:
        return projection._rmatvec(g)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        ctx.projection = inputs[1]  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _project_function().apply(grad, ctx.projection, None), None  # type: ignore[attr-defined]


class _ProjectAdjoint(_ProjectAdjointCore):
    """_ProjectAdjointCore with forward-mode AD and vmap rules."""

    @staticmethod
    def jvp(ctx: object, tangent: torch.Tensor, _: None) -> torch.Tensor:
        return _ProjectAdjoint.apply(tangent, ctx.projection)  # type: ignore[attr-defined]

    @staticmethod
    def vmap(info: object, in_dims: tuple, g: torch.Tensor, projection: object) -> tuple:
        if in_dims[0] is not None:
            g = g.movedim(in_dims[0], 0)
        return _ProjectAdjoint.apply(g, projection), 0 if in_dims[0] is not None else None


def _project_function() -> type[_ProjectCore]:
    """Dynamo does not trace autograd Functions with custom jvp/vmap: compile the core."""
    return _ProjectCore if torch.compiler.is_compiling() else _Project


def _adjoint_function() -> type[_ProjectAdjointCore]:
    return _ProjectAdjointCore if torch.compiler.is_compiling() else _ProjectAdjoint


class StructuredProjection(nn.Module):
    """Implicit W ∈ R^{P×d}: signed, permuted Walsh–Hadamard blocks, interleaved (module docstring).

    Same constructor and forward as DenseProjection: `row_scale` (P,) is a per-row gain folded
    into W, and forward maps u (d,) to row_scale ⊙ (W u) (P,), or (..., d) to (..., P). Exact
    properties: |W_pi| = |row_scale_p| / √max(P, d) for every entry; with row_scale = 1 and P ≥ d,
    unit-norm columns, WᵀW = I when n divides P and |(WᵀW − I)_ik| ≤ (⌈P/n⌉n − P)/P otherwise.
    Memory 6·⌈P/n⌉·n ≤ 6(P + n) bytes (int16 sources, float32 gain); time O((P + n) log n) per
    pass.
    """

    sources: torch.Tensor
    signs: torch.Tensor
    gain: torch.Tensor | None
    column_mean: torch.Tensor | None

    def __init__(self, out_features: int, in_features: int, seed: int, row_scale: RowScale):
        super().__init__()
        positive_int("out_features", out_features)
        positive_int("in_features", in_features)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self._out = out_features
        self._in = in_features
        self.seed = seed
        self.n = 1 << (in_features - 1).bit_length()  # smallest power of two ≥ d
        self.blocks = -(-out_features // self.n)
        self._check_row_scale(row_scale)

        sources = _sources(seed, self.blocks, self.n, in_features)  # (n, B)
        # Not persistent: the seed (and row_scale) regenerate everything, as for DenseProjection.
        self.register_buffer("sources", sources.view(-1), persistent=False)  # (Bn,)
        self.register_buffer("gain", None, persistent=False)  # (Bn,) per-row gain, signs folded
        self.register_buffer("signs", None, persistent=False)  # (Bn,) int8, with segments
        self.register_buffer("column_mean", None, persistent=False)  # filled on first use
        self.register_buffer("column_sq", None, persistent=False)  # filled on first use
        # An empty float tensor: follows .to()/.double(), so dtype-free state knows its dtype.
        self.register_buffer("float_like", torch.empty(0), persistent=False)
        self._segments: list[tuple[int, int, float]] | None = None
        self.set_row_scale(row_scale)

    def _check_row_scale(self, row_scale: object) -> None:
        if not isinstance(row_scale, (torch.Tensor, PiecewiseScale)):
            raise TypeError(f"row_scale must be a tensor, got {type(row_scale).__name__}")
        if tuple(row_scale.shape) != (self._out,):
            raise ValueError(
                f"row_scale must have shape ({self._out},) (one gain per output), "
                f"got {tuple(row_scale.shape)}"
            )

    def set_row_scale(self, row_scale: RowScale) -> None:
        """The per-row gain row_scale_p · t_p / √max(P, d), each computed in float64 (sqrt is
        correctly rounded) and rounded once, so W is identical everywhere.

        Two layouts, bit-identical (y·t·c rounds exactly like y·(t·c)): one float per row with
        the output sign folded in (4 B per row, one multiplication per pass), or, for a
        PiecewiseScale over more than 2^22 rows, the signs as int8 and one float per segment
        (1 B per row; a few small operations per segment, noise at that size).
        """
        self._check_row_scale(row_scale)
        scale = 1.0 / math.sqrt(max(self._out, self._in))
        key = stream_key(self.seed, "output_signs")
        self.column_mean = self.column_sq = None
        size = self.blocks * self.n
        if isinstance(row_scale, PiecewiseScale) and self._out > PER_ROW_GAIN_MAX:
            values = torch.tensor(row_scale.values, dtype=torch.float32).to(torch.float64)
            rounded = (values * scale).to(torch.float32).tolist()  # exact in float32
            starts = [0, *itertools.accumulate(row_scale.sizes)]
            signs = torch.zeros(size, dtype=torch.int8)  # 0 past P: the dropped rows vanish
            for lo in range(0, self._out, _BUILD_CHUNK):  # chunks: no P-sized temporary
                hi = min(self._out, lo + _BUILD_CHUNK)
                signs[lo:hi] = hash_signs(key, lo, hi)
            self._segments = list(zip(starts[:-1], starts[1:], rounded))
            self.gain, self.signs = None, signs.to(self.sources.device)
            return
        if isinstance(row_scale, torch.Tensor):
            row_scale = row_scale.detach().cpu()
        gain = torch.zeros(size)  # (Bn,) 0 past P
        for lo in range(0, self._out, _BUILD_CHUNK):  # chunks: no float64 copy of all P
            hi = min(self._out, lo + _BUILD_CHUNK)
            rows = (
                row_scale.rows(lo, hi)
                if isinstance(row_scale, PiecewiseScale)
                else row_scale[lo:hi]
            )
            exact = rows.to(torch.float64) * hash_signs(key, lo, hi) * scale
            gain[lo:hi] = exact.to(torch.float32)
        self._segments = None
        self.gain, self.signs = gain.to(self.float_like), None

    def _apply_gain(self, buffer: torch.Tensor) -> None:
        """buffer (N, Bn) *= the per-row gain (zero past P), in place."""
        if self.gain is not None:
            buffer *= self.gain.to(buffer.dtype)
            return
        assert self.signs is not None and self._segments is not None
        # Signs in chunks: a float op with an int8 operand converts it in a temporary.
        for lo in range(0, self.signs.numel(), _INDEX_CHUNK):
            buffer[:, lo : lo + _INDEX_CHUNK] *= self.signs[lo : lo + _INDEX_CHUNK]
        for start, stop, value in self._segments:
            buffer[:, start:stop] *= value

    def row_gains(self) -> torch.Tensor:  # () -> (P,)
        """row_scale_p · t_p / √max(P, d) for every row p: the gain W's row p carries."""
        if self.gain is not None:
            return self.gain[: self._out].clone()
        assert self.signs is not None and self._segments is not None
        gains = torch.cat([torch.full((b - a,), v) for a, b, v in self._segments])
        return gains.to(self.float_like) * self.signs[: self._out]

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> (..., P): offset + row_scale ⊙ (W u); `offset` (P,) is optional."""
        self._check_last(u, self._in, "u")
        if offset is not None and tuple(offset.shape) != (self._out,):
            raise ValueError(f"offset must have shape ({self._out},), got {tuple(offset.shape)}")
        return _project_function().apply(u, self, offset)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:  # (..., P) -> (..., d)
        """Wᵀ g (row_scale included), differentiable; the transposed pass of forward."""
        self._check_last(g, self._out, "g")
        return _adjoint_function().apply(g, self)

    def weighted_row_sq_norms(self, c: torch.Tensor) -> torch.Tensor:  # (d,) -> (P,)
        """Σ_i W_pi² c_i with row_scale: exactly row_scale_p² · Σ_i c_i / max(P, d), because every
        entry of a row has the same magnitude. Differentiable in c."""
        if tuple(c.shape) != (self._in,):
            raise ValueError(f"c must have shape ({self._in},), got {tuple(c.shape)}")
        return self.row_gains().to(c.dtype).square() * c.sum()

    def column_sq_norms(self) -> torch.Tensor:  # () -> (d,)
        """Σ_p W_pi² with row_scale: the same for every column, Σ_p row_scale_p² / max(P, d)
        (cached until the gains change)."""
        if self.column_sq is None:
            if self._segments is not None:  # float64 over segments: no P-vector
                total = sum((b - a) * v * v for a, b, v in self._segments)
                self.column_sq = torch.full((self._in,), total).to(self.float_like)
            else:
                total = self.row_gains().double().square().sum()  # float64: P terms
                self.column_sq = total.to(self.float_like).expand(self._in).clone()
        return self.column_sq

    def column_means(self) -> torch.Tensor:  # () -> (d,)
        """mean_p W_pi with row_scale: Wᵀ 1 / P by one transposed pass (in float64), then cached."""
        if self.column_mean is None:
            ones = torch.ones(self._out, dtype=torch.float64, device=self.sources.device)
            self.column_mean = (self._rmatvec(ones) / self._out).to(self.float_like)
        return self.column_mean

    def to_dense(self) -> torch.Tensor:  # () -> (P, d)
        """W materialised (P·d floats): for tests and comparisons on small sizes only."""
        eye = torch.eye(self._in).to(self.float_like)  # (d, d)
        return self._matvec(eye).T.contiguous()

    def extra_repr(self) -> str:
        return f"out_features={self._out}, in_features={self._in}, n={self.n}, blocks={self.blocks}"

    # The two passes. Both take leading batch axes, run under no autograd (the Functions above
    # supply the derivatives) and compute in the input's floating dtype. Layout: block j's
    # transform y_j is column j of an (n, B) matrix, because the interleave (row a of block j ->
    # output a·B + j) is then that matrix's own memory order (no transpose copy), and every
    # butterfly of `fwht(·, dim=1)` runs over contiguous runs of ≥ B numbers.

    def _blocks(self, u: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, n, B), [:, a, j] = y_j[a]
        count, blocks, n = u.shape[0], self.blocks, self.n
        # Every slot of every block gathers its signed input (or the zero) from this small
        # vector: reads hit the cache, writes run in order (a scatter writes all over x).
        signed = torch.cat([u, -u, u.new_zeros(count, 1)], dim=1)  # (N, 2d + 1)
        # Every call allocates its own buffers (no work buffers kept between calls): a module
        # shared by threads stays correct.
        x = u.new_empty(count, n * blocks)  # (N, Bn)
        for lo in range(0, n * blocks, _INDEX_CHUNK):  # chunks bound the int32 index copy
            hi = min(n * blocks, lo + _INDEX_CHUNK)
            index = self.sources[lo:hi].int()
            if count == 1:  # the 1-D gather is the fastest (CNN2: 0.08 against 0.10 ms)
                torch.index_select(signed[0], 0, index, out=x[0, lo:hi])
            else:
                torch.index_select(signed, 1, index, out=x[:, lo:hi])
        return fwht(x.view(count, n, blocks), dim=1)

    def _matvec(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> (..., P): row_scale ⊙ (W u), plus `offset` (broadcast) when given."""
        lead = u.shape[:-1]
        flat = u.reshape(-1, self._in)  # (N, d)
        if not flat.is_floating_point():
            raise TypeError(f"u must be floating point, got {u.dtype}")
        y = self._blocks(flat)  # (N, n, B), already in output order
        count = y.shape[0]
        out = y.view(count, self.n * self.blocks)  # (N, Bn)
        self._apply_gain(out)
        if offset is not None:  # into the buffer, before the output view is taken
            out[:, : self._out] += offset.to(y.dtype).reshape(-1, self._out)
        out = out[:, : self._out]  # (N, P), drops rows ≥ P
        if count > 1:
            out = out.contiguous()
        return out.view(*lead, self._out)

    def _rmatvec(self, g: torch.Tensor) -> torch.Tensor:  # (..., P) -> (..., d)
        lead = g.shape[:-1]
        flat = g.reshape(-1, self._out)  # (N, P)
        if not flat.is_floating_point():
            raise TypeError(f"g must be floating point, got {g.dtype}")
        return self._rmatvec_pieces([flat], [self._out]).view(*lead, self._in)

    def _rmatvec_pieces(
        self, pieces: Pieces, sizes: Sequence[int], weights: PieceWeights | None = None
    ) -> torch.Tensor:
        """Wᵀ g for g given as consecutive pieces (N, k) of its P entries (None: zeros): (N, d).

        Each piece is multiplied by its rows' gain straight into the pass's buffer, so the
        pieces (one per generated tensor) are never concatenated first. `weights` (one (k,) per
        piece) multiply the pieces first, in the same buffer: g ⊙ w, then the gain (a
        multiplicative update's θ_pre, whose product with g is never a tensor of its own).
        """
        padded = self._adjoint_input(pieces, sizes, weights)  # (N, Bn)
        count = padded.shape[0]
        y = fwht(padded.view(count, self.n, self.blocks), dim=1)  # Hᵀ = H
        return self._adjoint_output(y.view(count, -1))

    def _adjoint_input(
        self, pieces: Pieces, sizes: Sequence[int], weights: PieceWeights | None = None
    ) -> torch.Tensor:
        """The transposed pass's buffer (N, Bn) before its transform: (g ⊙ w) times each row's
        gain, in output order, zero past P (see `_rmatvec_pieces`)."""
        present = next(p for p in pieces if p is not None)
        count, blocks, n = present.shape[0], self.blocks, self.n
        # Apply the gain (zero for the dropped rows ≥ P); output order is the (n, B) layout.
        # With segments: (g·c)·t rounds exactly like g·(c·t), the gain the forward applies.
        padded = present.new_empty(count, n * blocks)  # (N, Bn)
        segments = self._segments
        aligned = segments is not None and [b - a for a, b, _ in segments] == list(sizes)
        gain = None if self.gain is None else self.gain.to(present.dtype)
        start = 0
        for index, (piece, size) in enumerate(zip(pieces, sizes)):
            target = padded[:, start : start + size]
            start += size
            if piece is None:
                target.zero_()
                continue
            if weights is not None:  # g ⊙ w into the buffer; the gain then multiplies in place
                piece = torch.mul(piece, weights[index], out=target)
            if gain is not None:
                torch.mul(piece, gain[start - size : start], out=target)
            elif aligned:
                torch.mul(piece, segments[index][2], out=target)  # type: ignore[index]
            elif weights is None:
                target.copy_(piece)
        padded[:, start:].zero_()
        if segments is not None:
            if not aligned:
                for a, b, value in segments:
                    padded[:, a:b] *= value
            signs = self.signs
            assert signs is not None
            for lo in range(0, signs.numel(), _INDEX_CHUNK):  # int8 operand: chunked temporary
                padded[:, lo : lo + _INDEX_CHUNK] *= signs[lo : lo + _INDEX_CHUNK]
        return padded

    def _adjoint_output(self, y: torch.Tensor) -> torch.Tensor:  # (N, Bn) -> (N, d)
        """The transposed pass after its transform: each slot's value goes back to the signed
        input it came from."""
        count, d, size = y.shape[0], self._in, self.n * self.blocks
        # Sums over blocks by scatter_add in index order (a serial loop per row on CPU, so the
        # order of additions is fixed), then (Wᵀg)_i = Σ(+u_i slots) − Σ(−u_i slots). The
        # zero's slot is dropped.
        total = y.new_zeros(count, 2 * d + 1)  # (N, 2d + 1)
        for lo in range(0, size, _INDEX_CHUNK):
            hi = min(size, lo + _INDEX_CHUNK)
            index = self.sources[lo:hi].long().expand(count, -1)  # (N, c)
            total.scatter_add_(1, index, y[:, lo:hi])
        return total[:, :d] - total[:, d : 2 * d]

    @staticmethod
    def _check_last(t: torch.Tensor, size: int, name: str) -> None:
        if t.dim() == 0 or t.shape[-1] != size:
            raise ValueError(f"{name} must have shape (..., {size}), got {tuple(t.shape)}")
