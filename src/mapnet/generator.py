"""The generator: latent z -> the target's tensors, θ = σ(θ₀ + W(z + α z⊙z)) (paper §2.2,
eq. 20–24).

`generate_group` is the hot path of every training step: one autograd node (`_GeneratedTensors`)
for the modulation, the projection with θ₀ added inside its pass, and the split into the
target's tensors; then σ and each tensor's dtype. `modulate_group` is the multiplicative update
of fine-tuning (eq. 25) on the same node. `pre_activation` is the same map composed of
ordinary differentiable operations, for the mapping loss and for tests.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from typing import Any

import torch
from torch import nn

from mapnet.config import ACTIVATIONS
from mapnet.projections import Projection, concat_pieces, fused
from mapnet.recompute import attach_recipe, plain_autograd


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
    *,
    composed: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fine-tuning (eq. 25): θ = θ_pre ⊙ (1 + m_⌈j/L⌉), m = σ(W(z + α z⊙z)) (⌈P/L⌉,); the
    group's tensors in `shapes` and `dtypes` order.

    With σ the identity (the default) in ordinary autograd, one node (`_ModulatedTensors`)
    computes every tensor in storage of its own, so a tensor nothing saves for backward (an
    embedding table's) is freed after the forward; with L > 1 each tensor also carries the
    recipe that regenerates it from the few factors (`mapnet.recompute`), so the target's
    layers need not keep it for backward. Otherwise, or with `composed`, the composed path:
    the projection's node and ordinary operations (any σ, a base that trains, forward-mode AD,
    torch.func transforms and torch.compile).
    """
    if not composed and activation == "identity" and plain_autograd(z, base):
        *tensors, factors = _ModulatedTensors.apply(
            z.to(compute_dtype(z)), projection, base, alpha, group_size, shapes
        )
        out = tuple(t.to(dtype) for t, dtype in zip(tensors, dtypes))
        if group_size > 1 and torch.is_grad_enabled():
            starts = itertools.accumulate((math.prod(s) for s in shapes), initial=0)
            for tensor, begin in zip(out, starts):
                recipe = _GroupRecipe(z, projection, base, alpha, factors, group_size, begin)
                attach_recipe(tensor, recipe.of(tensor))
        return out
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


# modulate_group by the composed path alone: the reference the one-node path is tested against.
_modulate_composed = functools.partial(modulate_group, composed=True)


def group_sums(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) -> (⌈P/L⌉,): the sum of each group of L consecutive entries (the last holds the
    P mod L remainder); the adjoint of `scale_by_groups` in its factors, in the same order of
    additions as autograd's derivative of it."""
    full = flat.numel() // group_size
    head = flat[: full * group_size].view(full, group_size).sum(1)
    if full * group_size == flat.numel():
        return head
    return torch.cat([head, flat[full * group_size :].sum().view(1)])


class _ModulatedTensors(torch.autograd.Function):
    """(z (d,), projection, θ_pre (P,), α, L, shapes) -> each tensor θ_pre ⊙ (1 + m_⌈j/L⌉) in
    its own storage, then the factors 1 + m (⌈P/L⌉,; empty for L = 1; not differentiable).

    The composed path keeps a P-sized θ whose tensors are views of it (so it lives as long as
    any of them), and its backward concatenates the tensors' gradients, multiplies them by
    θ_pre and only then projects: three P-sized tensors at once. Here the backward writes
    g ⊙ θ_pre straight into the projection's buffer (L = 1) or into one buffer it sums by
    groups (L > 1). Values and gradients are those of the composed path, bit for bit.
    """

    @staticmethod
    def forward(
        z: torch.Tensor,
        projection: nn.Module,
        base: torch.Tensor,
        alpha: float,
        group_size: int,
        shapes: tuple[tuple[int, ...], ...],
    ) -> tuple[torch.Tensor, ...]:
        u = z + alpha * z * z  # (d,)
        m = fused.matvec(projection, u)  # (M,)
        sizes = [math.prod(shape) for shape in shapes]
        if group_size == 1:
            tensors = tuple(
                torch.addcmul(b.view(shape), b.view(shape), piece.view(shape))
                for b, piece, shape in zip(base.split(sizes), m.split(sizes), shapes)
            )
            return (*tensors, m.new_empty(0))
        factors = 1 + m  # (M,)
        starts = itertools.accumulate(sizes, initial=0)
        tensors = tuple(
            scaled_range(base, factors, group_size, begin, shape)
            for begin, shape in zip(starts, shapes)
        )
        return (*tensors, factors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        z, projection, base, alpha, group_size, shapes = inputs
        ctx.save_for_backward(z)
        # θ_pre is a buffer: kept as an attribute, so saved-tensor hooks (offloading) never
        # copy it; its version is checked in backward as autograd checks a saved tensor's.
        ctx.base, ctx.base_version = base, base._version
        ctx.projection, ctx.alpha, ctx.group_size = projection, alpha, group_size
        ctx.sizes = [math.prod(shape) for shape in shapes]
        ctx.mark_non_differentiable(output[-1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        (z,) = ctx.saved_tensors
        grads = grads[:-1]  # the factors' (never differentiable)
        none = (None,) * 5
        if all(g is None for g in grads) or not ctx.needs_input_grad[0]:
            return (None, *none)
        base, sizes, group_size = ctx.base, ctx.sizes, ctx.group_size
        if base._version != ctx.base_version:
            raise RuntimeError(
                "θ_pre (a base buffer of the mapped module) was modified in place between "
                "the forward and this backward: the gradient would use other weights"
            )
        pieces = [None if g is None else g.reshape(1, -1) for g in grads]  # (1, k) each
        bases = base.split(sizes)
        if torch.is_grad_enabled():  # create_graph=True: differentiable, for double backward
            flat = concat_pieces(pieces, sizes)[0] * base  # (P,)
            v = ctx.projection.adjoint(flat if group_size == 1 else group_sums(flat, group_size))
        elif group_size == 1:
            v = fused.rmatvec_pieces(ctx.projection, pieces, sizes, bases)[0]  # Wᵀ(g ⊙ θ_pre)
        else:
            product = base.new_empty(base.shape)  # g ⊙ θ_pre, one buffer for the group sums
            for piece, b, part in zip(pieces, bases, product.split(sizes)):
                if piece is None:
                    part.zero_()
                else:
                    torch.mul(piece[0], b, out=part)
            sums = group_sums(product, group_size)  # (M,)
            del product
            v = fused.rmatvec_pieces(ctx.projection, [sums[None]], [sums.numel()])[0]
        return (v * (1 + 2 * ctx.alpha * z), *none)


class _GroupRecipe:
    """How `modulate_group` made one tensor of a group with L > 1 (`mapnet.recompute`): from the
    factors it computed, bit for bit; under a backward that builds a graph, from the latent
    through ordinary operations, so second derivatives reach z."""

    def __init__(
        self,
        z: torch.Tensor,
        projection: Projection,
        base: torch.Tensor,
        alpha: float,
        factors: torch.Tensor,
        group_size: int,
        begin: int,
    ):
        self.z, self.z_version = z, z._version
        self.base, self.base_version = base, base._version
        self.projection, self.alpha, self.factors = projection, alpha, factors
        self.group_size, self.begin = group_size, begin
        self.shape: tuple[int, ...] = ()
        self.dtype = base.dtype

    def of(self, tensor: torch.Tensor) -> _GroupRecipe:
        """This recipe for one tensor: where it begins, its shape and dtype."""
        recipe = copy.copy(self)
        recipe.shape, recipe.dtype = tuple(tensor.shape), tensor.dtype
        return recipe

    def regenerate(self) -> torch.Tensor:
        if self.base._version != self.base_version:
            raise RuntimeError(
                "θ_pre (a base buffer of the mapped module) was modified in place between the "
                "forward and the backward that needs a weight generated from it"
            )
        if not torch.is_grad_enabled():
            made = scaled_range(self.base, self.factors, self.group_size, self.begin, self.shape)
            return made.to(self.dtype)
        if self.z._version != self.z_version:
            raise RuntimeError(
                "the latent was modified in place between the forward and a backward that "
                "builds a graph (create_graph=True) through the weights generated from it"
            )
        z = self.z.to(compute_dtype(self.z))
        factors = 1 + self.projection(z + self.alpha * z * z)  # (M,), differentiable in z
        size = math.prod(self.shape)
        theta = scale_by_groups(self.base, factors, self.group_size)  # (P,)
        return theta[self.begin : self.begin + size].view(self.shape).to(self.dtype)


def scaled_range(
    base: torch.Tensor,
    factors: torch.Tensor,
    group_size: int,
    begin: int,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """θ_j = base_j · factors_⌈j/L⌉ for the entries begin ≤ j < begin + numel of one tensor, in
    a tensor of `shape` of its own: `scale_by_groups` restricted to a range (the same single
    multiplication per entry, so the same bits), without a P-sized product."""
    size = math.prod(shape)
    out = base.new_empty(shape)
    flat, source = out.view(-1), base[begin : begin + size]
    group = begin // group_size
    head = min(size, (-begin) % group_size)  # the entries before the first group boundary
    if head:
        torch.mul(source[:head], factors[group], out=flat[:head])
        group += 1
    full = (size - head) // group_size
    stop = head + full * group_size
    if full:
        torch.mul(
            source[head:stop].view(full, group_size),
            factors[group : group + full, None],
            out=flat[head:stop].view(full, group_size),
        )
    if stop < size:
        torch.mul(source[stop:], factors[group + full], out=flat[stop:])
    return out


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
        return _split_detached(fused.matvec(projection, u, offset), shapes)  # θ₀ + W u, split

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
            v = fused.rmatvec_pieces(ctx.projection, pieces, ctx.sizes)[0]  # (d,) = Wᵀ g
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
