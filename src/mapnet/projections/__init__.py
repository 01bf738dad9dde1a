"""Fixed projections W ∈ R^{P×d}, regenerated from a seed and never stored (paper §2.2).

"structured" (the default): signed, permuted Walsh–Hadamard blocks, 3–8 bytes per generated
parameter (structured.py says when), bit-identical everywhere. "dense": W in memory, P·d
floats, for the paper's ablations.
"""

from __future__ import annotations

from mapnet.projections.dense import DenseProjection, orthonormal_matrix
from mapnet.projections.protocol import PiecewiseScale, Projection, RowScale, concat_pieces
from mapnet.projections.seeding import derive_seed
from mapnet.projections.structured import StructuredProjection, fwht

# A dense W larger than this is refused (5 GiB: CNN1 at d = 2048 needs 4.1 GiB, ResNet-50 209 GB).
DENSE_MAX_BYTES = 5 * 2**30
KINDS: dict[str, type] = {"structured": StructuredProjection, "dense": DenseProjection}
# Bumped whenever a kind's W for a given seed changes: part of a checkpoint's identity.
ALGORITHMS = {"structured": "walsh-hadamard-blocks/1", "dense": "gaussian-cholesky-qr/1"}


def make_projection(
    kind: str, out_features: int, in_features: int, seed: int, row_scale: RowScale
) -> Projection:
    """The projection of `kind` for P = out_features, d = in_features."""
    if kind == "dense":
        size = out_features * in_features * 4
        if size > DENSE_MAX_BYTES:
            raise ValueError(
                f"a dense projection for {out_features:,} parameters at d = {in_features} needs "
                f"{size / 2**30:.1f} GiB (limit mapnet.projections.DENSE_MAX_BYTES = "
                f"{DENSE_MAX_BYTES / 2**30:.0f} GiB): use projection='structured' (O(P) memory)"
            )
    return KINDS[kind](out_features, in_features, seed, row_scale)


__all__ = [
    "ALGORITHMS",
    "DENSE_MAX_BYTES",
    "DenseProjection",
    "PiecewiseScale",
    "Projection",
    "RowScale",
    "StructuredProjection",
    "concat_pieces",
    "derive_seed",
    "fwht",
    "make_projection",
    "orthonormal_matrix",
]
