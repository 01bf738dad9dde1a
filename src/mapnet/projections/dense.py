"""The dense fixed projection: W ∈ R^{P×d} with orthonormal columns, in memory, regenerated from
a seed (the paper's "orthogonally initialised" mapping, §3.1). P·d floats: for the ablations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mapnet.projections.protocol import (
    Pieces,
    PieceWeights,
    PiecewiseScale,
    RowScale,
    concat_pieces,
)

# Rows of the random matrix are drawn and orthonormalised in blocks of this many, so peak memory
# stays at one P×d matrix plus a block. Part of the seed contract: changing it changes W.
_BLOCK_ROWS = 1 << 16


def orthonormal_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float32 matrix with orthonormal columns (orthonormal rows when rows < cols).

    Tall Gaussian matrices are so well conditioned (κ ≈ (1+√(c/r))/(1-√(c/r))) that one pass of
    Cholesky-QR is accurate in float32 (‖WᵀW − I‖_max ≈ 1e-6 for CNN2 at d = 2048). It is
    BLAS-3 throughout, works block by block in place, and is faster than Householder QR here.
    """
    if rows < cols:
        return orthonormal_matrix(cols, rows, seed).T.contiguous()
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(rows, cols)  # (P, d)
    blocks = [(s, min(s + _BLOCK_ROWS, rows)) for s in range(0, rows, _BLOCK_ROWS)]
    for start, stop in blocks:
        a[start:stop].normal_(generator=generator)
    if rows < 4 * cols:  # near-square: conditioning too poor for Cholesky-QR
        q, r = torch.linalg.qr(a.double())
        q *= torch.sign(torch.diagonal(r)).masked_fill_(torch.diagonal(r) == 0, 1.0)
        return q.float()
    gram = torch.zeros(cols, cols)  # (d, d)
    for start, stop in blocks:
        gram += a[start:stop].T @ a[start:stop]
    # gram = Rᵀ R; W = A R⁻¹. Multiplying by the explicit inverse is as accurate here (κ(R) ≈ 1)
    # and faster than a triangular solve.
    inverse = torch.linalg.inv(torch.linalg.cholesky(gram.double()).T).float()  # (d, d)
    for start, stop in blocks:
        a[start:stop] = a[start:stop] @ inverse
    return a


class DenseProjection(nn.Module):
    """W ∈ R^{P×d}, orthonormal columns scaled per row, held in memory (P·d floats).

    `row_scale` (P,) is folded into W once, so generation is a single matrix-vector product.
    """

    weight: torch.Tensor

    def __init__(self, out_features: int, in_features: int, seed: int, row_scale: RowScale):
        super().__init__()
        self.seed = seed
        if isinstance(row_scale, PiecewiseScale):
            row_scale = row_scale.dense()
        weight = orthonormal_matrix(out_features, in_features, seed)  # (P, d)
        weight *= row_scale.to(weight.dtype)[:, None]
        # Not persistent: the seed regenerates it, so checkpoints never carry it.
        self.register_buffer("weight", weight, persistent=False)
        # Column statistics for the mapping loss, cached until the gains change.
        self.register_buffer("column_sq", None, persistent=False)
        self.register_buffer("column_mean", None, persistent=False)

    def set_row_scale(self, row_scale: RowScale) -> None:
        """Rebuild W with another per-row gain (as if constructed with it): regenerates W."""
        if isinstance(row_scale, PiecewiseScale):
            row_scale = row_scale.dense()
        weight = orthonormal_matrix(self.out_features, self.in_features, self.seed)
        weight *= row_scale.to(weight.dtype)[:, None]
        self.weight = weight.to(device=self.weight.device, dtype=self.weight.dtype)
        self.column_sq = self.column_mean = None

    def _weight_as(self, u: torch.Tensor) -> torch.Tensor:
        return self.weight if self.weight.dtype == u.dtype else self.weight.to(u.dtype)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> (..., P): offset + W u (one fused addmv for a single u with an offset);
        `offset` (P,) or broadcastable to (..., P)."""
        weight = self._weight_as(u)
        if offset is not None:
            offset = offset.to(u.dtype)
        if u.dim() == 1:
            return weight @ u if offset is None else torch.addmv(offset, weight, u)
        out = u @ weight.T  # (..., P)
        return out if offset is None else out + offset

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:  # (..., P) -> (..., d)
        """Wᵀ g, differentiable."""
        return g @ self._weight_as(g)

    # The raw passes the fused generator (generator.py) calls (it supplies the derivatives).

    def _matvec(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(u, offset)

    def _rmatvec_pieces(
        self, pieces: Pieces, sizes: Sequence[int], weights: PieceWeights | None = None
    ) -> torch.Tensor:
        """Wᵀ (g ⊙ w) for g given as consecutive pieces (N, k) of its P entries (None: zeros)
        and `weights` w one (k,) per piece (None: ones): (N, d)."""
        if weights is not None:
            pieces = [None if p is None else p * w for p, w in zip(pieces, weights)]
        flat = concat_pieces(pieces, sizes)
        return flat @ self._weight_as(flat)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}"

    # What the mapping loss needs (paper §2.3, eq. 29–30), exact, in row blocks (no second P×d).

    def weighted_row_sq_norms(self, c: torch.Tensor) -> torch.Tensor:  # (d,) -> (P,)
        """Σ_i W_pi² c_i for every row p."""
        out = torch.empty(self.out_features, dtype=self.weight.dtype, device=self.weight.device)
        for start in range(0, self.out_features, _BLOCK_ROWS):
            block = self.weight[start : start + _BLOCK_ROWS]
            out[start : start + _BLOCK_ROWS] = block.square() @ c
        return out

    def column_sq_norms(self) -> torch.Tensor:  # (d,)
        """Σ_p W_pi² for every column i (cached)."""
        if self.column_sq is None:
            out = torch.zeros(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
            for start in range(0, self.out_features, _BLOCK_ROWS):
                out += self.weight[start : start + _BLOCK_ROWS].square().sum(0)
            self.column_sq = out
        return self.column_sq

    def column_means(self) -> torch.Tensor:  # (d,)
        """mean_p W_pi for every column i (cached)."""
        if self.column_mean is None:
            self.column_mean = self.weight.mean(0)
        return self.column_mean
