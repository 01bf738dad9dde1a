"""What every fixed projection offers: the surface the generator and the mapping loss use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class PiecewiseScale:
    """A per-row gain that is constant over consecutive segments (one per generated tensor):
    a projection keeps one number per segment instead of P."""

    sizes: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def shape(self) -> tuple[int]:
        return (sum(self.sizes),)

    def dense(self) -> torch.Tensor:  # (P,) float32
        return self.rows(0, self.shape[0])

    def rows(self, lo: int, hi: int) -> torch.Tensor:  # (hi - lo,) float32
        """The gains of rows lo ≤ p < hi, without materialising the others."""
        parts, start = [], 0
        for size, value in zip(self.sizes, self.values):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                parts.append(torch.full((b - a,), value))
            start += size
        return torch.cat(parts) if parts else torch.zeros(0)


RowScale = torch.Tensor | PiecewiseScale

# A transposed pass's input: g as consecutive pieces (N, k) of its P entries, a None standing for
# zeros (an unused parameter's gradient), and the weights w that multiply them, one (k,) a piece.
Pieces = Sequence[torch.Tensor | None]
PieceWeights = Sequence[torch.Tensor]


@runtime_checkable
class Projection(Protocol):
    """A fixed W ∈ R^{P×d} with a per-row gain folded in, regenerated from a seed.

    `forward(u, offset)` maps (..., d) to offset + W u (..., P) differentiably (autograd, forward
    AD, vmap). `_matvec` and `_rmatvec_pieces` are the raw passes the fused generator calls (it
    supplies the derivatives). The mapping loss (paper §2.3, eq. 29–30) needs the three norms.
    """

    seed: int

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    def forward(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor: ...

    def adjoint(self, g: torch.Tensor) -> torch.Tensor: ...

    def set_row_scale(self, row_scale: RowScale) -> None: ...

    def _matvec(self, u: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor: ...

    def _rmatvec_pieces(
        self, pieces: Pieces, sizes: Sequence[int], weights: PieceWeights | None = None
    ) -> torch.Tensor: ...

    def weighted_row_sq_norms(self, c: torch.Tensor) -> torch.Tensor: ...

    def column_sq_norms(self) -> torch.Tensor: ...

    def column_means(self) -> torch.Tensor: ...


def concat_pieces(pieces: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> torch.Tensor:
    """(N, Σk) from consecutive pieces (N, k), a None standing for zeros (an unused parameter's
    gradient). At least one piece must be a tensor."""
    present = next(p for p in pieces if p is not None)
    zeros = present.new_zeros
    return torch.cat([zeros(len(present), k) if p is None else p for p, k in zip(pieces, sizes)], 1)
