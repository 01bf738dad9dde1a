"""The generator: latent z -> the target's tensors, θ = σ(θ₀ + W(z + α z⊙z)) (paper §2.2,
eq. 20–24).

`generate_group` is the hot path of every training step: one autograd node (`_GeneratedTensors`)
for the modulation, the projection with θ₀ added inside its pass, and the split into the
target's tensors; then σ and each tensor's dtype. `modulate_group` is the multiplicative update
of fine-tuning (eq. 25) on the same node. `pre_activation` is the same map composed of
ordinary differentiable operations, for the mapping loss and for tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mapnet.config import ACTIVATIONS
from mapnet.projections import Projection, concat_pieces


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """Generation runs in at least float32: a bfloat16 Walsh–Hadamard pass would lose ~3 digits."""
    return torch.promote_types(z.dtype, torch.float32)


def pre_activation(
    z: torch.Tensor, projection: Projection, base: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """a = θ₀ + W(z + α z⊙z) (P_g,), composed of differentiable operations."""
    z = z.to(compute_dtype(z))  # (d,)
    u = z + alpha * z * z  # (d,) = W̃z / W with W̃_i = W_i(1 + α z_i)
    return projection(u, base)  # (P_g,)


def generate_group(
    z: torch.Tensor,
    projection: Projection,
    base: torch.Tensor | None,
    alpha: float,
    activation: str,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
) -> tuple[torch.Tensor, ...]:
    """One latent group's tensors, in `shapes` and `dtypes` order."""
    function = _GeneratedTensorsCore if torch.compiler.is_compiling() else _GeneratedTensors
    pieces = function.apply(z.to(compute_dtype(z)), projection, base, alpha, shapes)
    sigma = ACTIVATIONS[activation]  # elementwise: per piece = on θ
    return tuple(sigma(piece).to(dtype) for piece, dtype in zip(pieces, dtypes))


def scale_by_groups(base: torch.Tensor, factors: torch.Tensor, group_size: int) -> torch.Tensor:
    """θ_j = base_j · factors_⌈j/L⌉ (P,), for base (P,) and factors (⌈P/L⌉,): the L weights of a
    group share one factor, the last group holds the P mod L remainder. The factors are
    broadcast over (P // L, L) views, never repeated to P."""
    if group_size == 1:
        return base * factors
    full = base.numel() // group_size  # groups of exactly L weights
    head = (base[: full * group_size].view(full, group_size) * factors[:full, None]).view(-1)
    if full == factors.numel():
        return head
    return torch.cat([head, base[full * group_size :] * factors[full]])


def modulate_group(
    z: torch.Tensor,
    projection: Projection,
    base: torch.Tensor,
    alpha: float,
    activation: str,
    group_size: int,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
) -> tuple[torch.Tensor, ...]:
    """Fine-tuning (eq. 25): θ = θ_pre ⊙ (1 + m_⌈j/L⌉), m = σ(W(z + α z⊙z)) (⌈P/L⌉,); the
    group's tensors in `shapes` and `dtypes` order."""
    function = _GeneratedTensorsCore if torch.compiler.is_compiling() else _GeneratedTensors
    shape = (projection.out_features,)
    (m,) = function.apply(z.to(compute_dtype(z)), projection, None, alpha, (shape,))  # (M,)
    m = ACTIVATIONS[activation](m)
    if group_size == 1:  # θ_pre + θ_pre ⊙ m: one P-sized result, no 1 + m in between
        theta = torch.addcmul(base, base, m)  # (P,)
    else:
        theta = scale_by_groups(base, 1 + m, group_size)  # (P,)
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(
        piece.view(shape).to(dtype)
        for piece, shape, dtype in zip(theta.split(sizes), shapes, dtypes)
    )


class _GeneratedTensorsCore(torch.autograd.Function):
    """(z (d,), projection, θ₀ (P,) or None, α, shapes) -> the group's tensors, θ₀ + W(z + αz⊙z)
    split into `shapes`: the hot path of every training step, as one autograd node.

    The composed path (`pre_activation`, then split and view) builds ~15 nodes:
    modulation, projection, split and one view per tensor, and its backward concatenates the
    tensors' gradients before the transposed pass. Here the backward writes each tensor's
    gradient straight into the pass's buffer (`_rmatvec_pieces`) and applies the modulation's
    derivative 1 + 2αz in closed form. With the structured projection's gather table, the
    generation + latent-gradient phases of a training step fell from 2.7 to 2.1 ms on CNN2 and
    from 8.6 to 5.0 ms on CNN1 (`mapnet bench step --malloc-tuned`, one thread, breakdown).
    Values equal the composed path's; double backward, forward-mode AD and vmap are supported
    (they use differentiable composed operations).
    """

    @staticmethod
    def forward(
        z: torch.Tensor,
        projection: nn.Module,
        offset: torch.Tensor | None,
        alpha: float,
        shapes: tuple[tuple[int, ...], ...],
    ) -> tuple[torch.Tensor, ...]:
        u = z + alpha * z * z  # (d,)
        return _split_detached(projection._matvec(u, offset), shapes)  # θ₀ + W u, split

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        z, projection, _, alpha, shapes = inputs
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        ctx.projection, ctx.alpha, ctx.shapes = projection, alpha, shapes
        ctx.sizes = [math.prod(shape) for shape in shapes]
        ctx.set_materialize_grads(False)  # an unused tensor's gradient stays None: no zeros made

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        (z,) = ctx.saved_tensors
        if all(g is None for g in grads):
            return None, None, None, None, None
        pieces = [None if g is None else g.reshape(1, -1) for g in grads]  # (1, k) each
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable for double backward
            flat = concat_pieces(pieces, ctx.sizes)[0]  # (P,)
            v = ctx.projection.adjoint(flat)  # (d,)
        else:
            flat = None
            v = ctx.projection._rmatvec_pieces(pieces, ctx.sizes)[0]  # (d,) = Wᵀ g
        grad_z = v * (1 + 2 * ctx.alpha * z) if ctx.needs_input_grad[0] else None
        grad_offset = None
        if ctx.needs_input_grad[2]:
            grad_offset = flat if flat is not None else concat_pieces(pieces, ctx.sizes)[0]
        return grad_z, None, grad_offset, None, None


class _GeneratedTensors(_GeneratedTensorsCore):
    """_GeneratedTensorsCore with forward-mode AD and vmap rules (torch.compile cannot trace
    Functions that define them, so compiled code uses the core)."""

    @staticmethod
    def jvp(ctx: Any, z_tangent: Any, _: None, offset_tangent: Any, *__: None) -> tuple:
        (z,) = ctx.saved_tensors
        u_tangent = z_tangent * (1 + 2 * ctx.alpha * z) if z_tangent is not None else None
        if u_tangent is None:
            flat = offset_tangent.clone()
        else:  # the differentiable, vmap-aware forward: jacfwd batches the tangents through it
            flat = ctx.projection(u_tangent, offset_tangent)
        return _split_detached(flat, ctx.shapes)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        z: torch.Tensor,
        projection: nn.Module,
        offset: torch.Tensor | None,
        alpha: float,
        shapes: tuple[tuple[int, ...], ...],
    ) -> tuple:
        # Batched: the composed operations (the projections take leading batch axes).
        z_dim, _, offset_dim = in_dims[:3]
        z = z.movedim(z_dim, 0) if z_dim is not None else z.expand(info.batch_size, -1)
        if offset_dim is not None:
            offset = offset.movedim(offset_dim, 0)
        u = z + alpha * z * z  # (N, d)
        flat = projection(u)  # (N, P)
        if offset is not None:
            flat = flat + offset
        sizes = [math.prod(shape) for shape in shapes]
        tensors = tuple(
            p.reshape(info.batch_size, *shape) for p, shape in zip(flat.split(sizes, -1), shapes)
        )
        return tensors, (0,) * len(tensors)


def _split_detached(flat: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> tuple:
    """(P,) -> one tensor per shape on flat's storage. detach(): for autograd they are plain
    tensors, not views of one another (a custom Function's outputs must not be)."""
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(p.view(shape).detach() for p, shape in zip(flat.split(sizes), shapes))
