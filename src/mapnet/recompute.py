"""Generated tensors that autograd does not keep for backward: it keeps how to make them again.

A layer keeps its weight for backward (a convolution or a linear layer needs it for the gradient
of its input), so every generated tensor would live from the forward to the end of the backward:
P numbers on top of θ_pre. When a tensor is cheap to make again (a multiplicative update with
groups of L > 1 weights: one multiplication per weight from ⌈P/L⌉ factors), the generator
attaches a recipe to it (`attach_recipe`), and inside `recomputed_when_saved` autograd saves the
recipe in its place (`torch.autograd.graph.saved_tensors_hooks`) and calls it when the backward
reads the tensor. Any other saved tensor goes to the hooks that were active outside, if any
(offloading to the CPU, say), or is kept as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

RECIPE_ATTRIBUTE = "_mapnet_recipe"


class Recipe(Protocol):
    """How to make a generated tensor again: the same values (bit for bit) without grad, a
    tensor differentiable in the latent when the backward builds a graph (create_graph=True)."""

    def regenerate(self) -> torch.Tensor: ...


def attach_recipe(tensor: torch.Tensor, recipe: Recipe) -> None:
    tensor.__dict__[RECIPE_ATTRIBUTE] = recipe


def plain_autograd(*tensors: torch.Tensor) -> bool:
    """True in ordinary eager autograd: not while torch.compile traces, no torch.func transform
    active, no forward-mode AD level open. The generator's memory-lean nodes and the recipes
    run only there; elsewhere the composed path does."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _Packed:
    """What autograd keeps of a generated tensor (or a view of one): its recipe and the view."""

    __slots__ = ("offset", "recipe", "size", "stride")

    def __init__(self, recipe: Recipe, saved: torch.Tensor):
        self.recipe = recipe
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def unpack(self) -> torch.Tensor:
        tensor = self.recipe.regenerate()
        if tensor.size() == self.size and tensor.stride() == self.stride and not self.offset:
            return tensor
        # A layer saved a view (a linear layer: weight.t()). The generated tensor had storage of
        # its own, so the view's offset counts from the remade tensor's first element.
        return tensor.as_strided(self.size, self.stride, tensor.storage_offset() + self.offset)


def recomputed_when_saved(tensors: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """A context inside which autograd saves the recipe of each of `tensors` that has one (and
    of any view of it) instead of the tensor. A no-op when none has a recipe, without grad, or
    outside plain autograd (a plain function, so torch.compile sees a nullcontext)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not plain_autograd():
        return contextlib.nullcontext()
    recipes = {
        id(t): recipe for t in tensors if (recipe := t.__dict__.get(RECIPE_ATTRIBUTE)) is not None
    }
    return _saving_recipes(recipes) if recipes else contextlib.nullcontext()


@contextlib.contextmanager
def _saving_recipes(recipes: dict[int, Recipe]) -> Iterator[None]:
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def pack(saved: torch.Tensor) -> Any:
        source = saved if saved._base is None else saved._base
        recipe = recipes.get(id(source))
        if recipe is not None:
            return _Packed(recipe, saved)
        return saved if outer is None else outer[0](saved)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Packed):
            return packed.unpack()
        return packed if outer is None else outer[1](packed)

    # The tensors are alive for the whole block (the caller holds them), so an id seen here
    # cannot belong to another tensor.
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
