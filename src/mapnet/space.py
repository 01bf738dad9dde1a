"""`ModelSpace`: many models as latents of one shared mapping.

W and θ₀ are fixed by the mapping's seed (paper §2.2), so every model trained through the same
mapping is a point z in one d-dimensional coordinate system. A space holds N such points,
latents (N, d), beside the one mapping that turns any of them into weights:

    θ_i = σ(θ₀ + g ⊙ W(z_i + α z_i⊙z_i))        member i (or any z: a midpoint, a soup)
    y_i = functional_call(target, θ_i, x)        batched over members with torch.func.vmap

What it is for (NetSpace, Learning the Space of Deep Models; hypernetworks mapping per-instance
embeddings to INR weights): interpolating between members, averaging them ("soups"),
optimising a latent in the space, and learning from the latents as data.

    space = mapnet.ModelSpace(lambda: Net(), mapnet.MappingConfig(latent_dim=256), n=8)
    logits = space(x)                           # (N, B, classes): every member on one batch
    space.save("space/"); mapnet.ModelSpace.load("space/", lambda: Net())

A member is its latent alone: the target's buffers are shared by every member, so a model
with running statistics (BatchNorm) is refused; parameters trained directly are refused too.

New instances can be encoded by a few plain gradient steps (`fit_latents`). Functa (Dupont
et al. 2022) meta-learns the shared part so that 3 such steps suffice; `learn_base` (θ₀) and
`learn_step_sizes` (per-dimension steps) make both learnable here, a variant beside the
paper's fixed θ₀.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.func import functional_call, vmap

from mapnet import files, identity
from mapnet.bases import ModelSource
from mapnet.checkpoint import read_safetensors
from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.module import MappedModule, wrap

SPACE_FORMAT = 2  # 2: space.json lists its files with their sha256 (1: tensors_sha256)
READABLE_FORMATS = (1, 2)
TENSOR_FILE = "space.safetensors"
DESCRIPTION_FILE = "space.json"
DEFAULT_CHUNK = 64  # members per vmap call: bounds the memory of generated weights


class ModelSpace(nn.Module):
    """N latents (N, d) that share one mapping and one θ₀; `latents` is the only parameter
    that trains (and `bases`, with learn_base; `log_step_sizes`, with learn_step_sizes).

    `model` is what `mapnet.wrap` takes (a factory or an instance) or an existing MappedModule,
    whose mapping is then used (a copy sharing its fixed tensors; its latent is not a member).
    Members start at the mapping's initial latent (z = 0 by default), or at `latents`.
    """

    def __init__(
        self,
        model: ModelSource | MappedModule,
        config: MappingConfig | None = None,
        n: int | None = None,
        *,
        latents: torch.Tensor | None = None,
        members: Sequence[dict[str, Any]] | None = None,
        learn_base: bool = False,
        learn_step_sizes: float | None = None,
    ):
        super().__init__()
        if isinstance(model, MappedModule):
            if config is not None:
                raise ValueError("a MappedModule brings its own config: pass config=None")
            # A copy that shares the fixed tensors (W, θ₀): the caller's module and its latent
            # stay as they are.
            mapping = copy.deepcopy(model, {id(b): b for b in model.buffers()})
        else:
            mapping = wrap(model, config)
        _check_shareable(mapping)
        mapping.requires_grad_(False)
        self.mapping = mapping
        self._sizes = [group.latent_dim for group in mapping.groups]
        start = torch.cat([z.detach() for z in mapping.latents])  # (d,)
        if latents is None:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"n must be a positive number of members, got {n!r}")
            latents = start.expand(n, -1).clone()  # (N, d)
        else:
            latents = self._checked_latents(latents, "latents")
            if n is not None and n != len(latents):
                raise ValueError(f"n={n} but latents holds {len(latents)} members")
        self.latents = nn.Parameter(latents.to(start).clone())
        self.members: list[dict[str, Any]] = [dict(m) for m in members or [{} for _ in latents]]
        if len(self.members) != len(latents):
            raise ValueError(f"{len(self.members)} member records for {len(latents)} latents")
        # A learned θ₀ shared by every member (the shared part functa meta-learns): a variant,
        # not the paper's method, in which θ₀ stays the initialisation.
        self.bases: nn.ParameterList | None = None
        if learn_base:
            bases = [mapping._base(i).detach() for i in range(len(mapping.groups))]
            if any(b.numel() == 0 for b in bases):
                raise ValueError(
                    "learn_base needs a θ₀ to start from; this mapping has base='zero'"
                )
            self.bases = nn.ParameterList([nn.Parameter(b.clone()) for b in bases])
        # Per-dimension step sizes of `fit_latents` (Meta-SGD, as functa meta-learns them),
        # stored as logarithms so they stay positive; they start at learn_step_sizes.
        self.log_step_sizes: nn.Parameter | None = None
        if learn_step_sizes is not None:
            number = isinstance(learn_step_sizes, (int, float)) and not isinstance(
                learn_step_sizes, bool
            )
            if not (number and 0 < learn_step_sizes < math.inf):
                raise ValueError(
                    "learn_step_sizes must be a positive initial step size, got "
                    f"{learn_step_sizes!r}"
                )
            self.log_step_sizes = nn.Parameter(
                torch.full((self.latent_dim,), math.log(learn_step_sizes), dtype=start.dtype)
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_members(
        cls, mapped: Sequence[MappedModule], members: Sequence[dict[str, Any]] | None = None
    ) -> ModelSpace:
        """A space of trained mapped models; every one must share the first one's mapping
        (same config, architecture, θ₀ and projection), else a CheckpointError names the
        difference. The first model's mapping becomes the space's (a copy)."""
        if not mapped:
            raise ValueError("from_members needs at least one MappedModule")
        own = mapped[0].fingerprint()
        for index, other in enumerate(mapped[1:], start=1):
            if not isinstance(other, MappedModule):
                raise TypeError(f"member {index} is a {type(other).__name__}, not a MappedModule")
            identity.compare(other.fingerprint(), own, f"member {index}")
        latents = torch.stack([torch.cat([z.detach() for z in m.latents]) for m in mapped])
        return cls(copy.deepcopy(mapped[0]), latents=latents, members=members)

    # ------------------------------------------------------------------ members

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def latent_dim(self) -> int:
        """d: the numbers of one member (all latent groups together)."""
        return sum(self._sizes)

    def _checked_latents(self, latents: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"{what} must be a tensor (K, {self.latent_dim}), got {type(latents)}")
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim or len(latents) == 0:
            raise ValueError(
                f"{what} must have shape (K >= 1, {self.latent_dim}) for this mapping, got "
                f"{tuple(latents.shape)}"
            )
        return latents

    def _indices(self, members: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        if members is None:
            return torch.arange(len(self))
        raw = torch.as_tensor(members)
        if raw.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        if raw.is_floating_point() or raw.is_complex():
            raise TypeError(f"member indices must be integers, got {raw.dtype}")
        index = raw.to(torch.long).reshape(-1)
        bad = index[(index < -len(self)) | (index >= len(self))]
        if len(bad):
            raise IndexError(
                f"member index {bad[0].item()} is out of range for a space of {len(self)}"
            )
        return index % len(self)

    def member(self, index: int) -> MappedModule:
        """Member `index` as a standalone MappedModule (a copy: training it leaves the space)."""
        (i,) = self._indices(index).tolist()
        return self.mapped_at(self.latents[i])

    def mapped_at(self, z: torch.Tensor) -> MappedModule:
        """A standalone MappedModule at latent `z` (d,): a member, a midpoint or a soup."""
        if self.bases is not None:
            raise ValueError(
                "with a learned base a point of this space is not a MappedModule of its mapping "
                "(whose θ₀ is the initialisation): use materialize_at(z) or space(x, latents=…)"
            )
        (z,) = self._checked_latents(z.reshape(1, -1), "z")
        module = copy.deepcopy(self.mapping)
        with torch.no_grad():
            for latent, part in zip(module.latents, z.detach().split(self._sizes)):
                latent.copy_(part)
                latent.requires_grad_(True)
        return module

    def materialize_at(self, z: torch.Tensor) -> nn.Module:
        """An ordinary module of the target's class holding the weights `z` (d,) generates."""
        (z,) = self._checked_latents(z.reshape(1, -1), "z")
        with torch.no_grad():
            return self.mapping.materialize(self.generate(z.detach()))

    # ------------------------------------------------------------------ generation, forward

    def generate(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weights one latent z (d,) generates, by parameter name (vmap-safe)."""
        bases = None if self.bases is None else list(self.bases)
        parts = list(z.split(self._sizes, dim=-1))
        return self.mapping.generate(parts, check_finite=False, bases=bases)

    def forward(
        self,
        *args: Any,
        members: int | Sequence[int] | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        chunk_size: int | None = DEFAULT_CHUNK,
        randomness: str = "different",
        **kwargs: Any,
    ) -> Any:
        """Every member (or `members`, or arbitrary `latents` (K, d)) on the same inputs:
        outputs stacked along a new first axis, (K, …). One vmap over members, `chunk_size`
        at a time (None: all at once); `randomness` is vmap's (dropout: "different" draws
        each member its own mask, "same" one for all)."""
        if latents is None:
            latents = self.latents[self._indices(members)]
        elif members is not None:
            raise ValueError("pass members or latents, not both")
        latents = self._checked_latents(latents, "latents")
        if not torch.isfinite(latents).all():  # N·d numbers: cheap beside any forward
            rows = (~torch.isfinite(latents)).any(1).nonzero().flatten().tolist()
            raise ValueError(f"latents of rows {rows[:5]} hold NaN/inf values")

        def one(z: torch.Tensor) -> Any:
            return self._run_at(z, args, kwargs)

        return vmap(one, chunk_size=chunk_size, randomness=randomness)(latents)

    def _run_at(self, z: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The target on the weights one latent z (d,) generates."""
        return functional_call(
            self.mapping.target, self.generate(z), args, kwargs, tie_weights=False
        )

    def member_forward(self, index: int, *args: Any, **kwargs: Any) -> Any:
        """Member `index` alone on its own inputs (members trained on different batches)."""
        (i,) = self._indices(index).tolist()
        return self._run_at(self.latents[i], args, kwargs)

    def loop_forward(self, *args: Any, latents: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The same as `forward`, one member at a time (the reference vmap is checked against)."""
        latents = self.latents if latents is None else self._checked_latents(latents, "latents")
        return torch.stack([self._run_at(z, args, kwargs) for z in latents])

    # ------------------------------------------------------------------ exploration

    def path(self, a: int, b: int, steps: int = 11) -> torch.Tensor:
        """Latents on the straight line from member a to member b: (steps, d), t = 0 … 1."""
        if steps < 2:
            raise ValueError(f"a path needs at least 2 steps, got {steps}")
        za, zb = self.latents[self._indices([a, b])].detach()
        t = torch.linspace(0, 1, steps, dtype=za.dtype, device=za.device).unsqueeze(1)
        return (1 - t) * za + t * zb

    def uniform_soup(self, members: Sequence[int] | None = None) -> torch.Tensor:
        """The mean latent of `members` (all by default), (d,)."""
        index = self._indices(members)
        if len(index) == 0:
            raise ValueError("a soup needs at least one member")
        return self.latents[index].detach().mean(0)

    def greedy_soup(
        self, score: Callable[[torch.Tensor], float], members: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Greedy soup (Wortsman et al. 2022) in latent space: members by their own `score`
        (higher is better; score a held-out split), best first; each is added to the running
        mean if that does not lower the score. Returns the soup (d,) and the members in it."""
        index = self._indices(members).tolist()
        if not index:
            raise ValueError("a soup needs at least one member")
        latents = self.latents.detach()
        scores = {i: score(latents[i]) for i in index}
        ranked = sorted(index, key=scores.__getitem__, reverse=True)
        chosen, best = [ranked[0]], scores[ranked[0]]
        for i in ranked[1:]:
            trial = latents[[*chosen, i]].mean(0)
            value = score(trial)
            if value >= best:
                chosen, best = [*chosen, i], value
        return latents[chosen].mean(0), chosen

    def optimise_latent(
        self,
        start: torch.Tensor,
        batches: Iterable[tuple[Any, Any]],
        loss: Callable[[Any, Any], torch.Tensor],
        lr: float = 0.05,
    ) -> torch.Tensor:
        """Adam on one latent from `start` (d,), a step per (inputs, targets) batch: on the
        task loss, or distillation when the targets are a teacher's outputs and `loss` compares
        them. Returns the latent (d,); the space is unchanged (`add` it to keep it)."""
        module = self.mapped_at(start)
        optimizer = torch.optim.Adam(module.latents, lr=lr)
        for inputs, targets in batches:
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            value = loss(module(*args), targets)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        return torch.cat([z.detach() for z in module.latents])

    def add(self, latents: torch.Tensor, members: Sequence[dict[str, Any]] | None = None) -> None:
        """Append latents (K, d) or (d,) as new members, with their records."""
        latents = latents.detach()
        if latents.dim() == 1:
            latents = latents.unsqueeze(0)
        latents = self._checked_latents(latents, "latents")
        records = [dict(m) for m in members] if members is not None else [{} for _ in latents]
        if len(records) != len(latents):
            raise ValueError(f"{len(records)} member records for {len(latents)} latents")
        grown = torch.cat([self.latents.detach(), latents.to(self.latents.dtype)])
        self.latents = nn.Parameter(grown, requires_grad=self.latents.requires_grad)
        self.members += records

    def fit_latents(
        self,
        loss: Callable[[Any], torch.Tensor],
        *args: Any,
        steps: int,
        start: torch.Tensor | None = None,
        count: int | None = None,
        step_size: float | torch.Tensor | None = None,
        create_graph: bool = False,
        chunk_size: int | None = DEFAULT_CHUNK,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Latents (K, d) after `steps` plain gradient steps z ← z - η ⊙ ∇z, from `start`
        (K, d) or `count` copies of the mapping's initial latent, through `forward` on `args`.

        `loss(outputs)` takes the outputs (K, …) and returns each latent's own loss (K,); they
        are summed, so one latent's step never depends on another's. η is `step_size` (a
        number or (d,)) or the learned step sizes (learn_step_sizes). With `create_graph` the
        result is differentiable in the bases and step sizes: meta-learning them so that a
        few steps fit a new instance is functa's recipe (Dupont et al. 2022), a variant, not
        the paper's method. The space's own latents are not touched.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive number of gradient steps, got {steps!r}")
        eta = self._step_sizes(step_size)
        if not create_graph and isinstance(eta, torch.Tensor):
            eta = eta.detach()  # no meta-gradient wanted: no graph to the step sizes either
        if start is None:
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                raise ValueError(f"pass start (K, d) or a positive count, got count={count!r}")
            initial = torch.cat([z.detach() for z in self.mapping.latents])
            start = initial.expand(count, -1)
        elif count is not None:
            raise ValueError("pass start or count, not both")
        z = self._checked_latents(start, "start").detach().clone().requires_grad_(True)
        with torch.enable_grad():  # encoding under no_grad (evaluation) still needs ∇z
            for _ in range(steps):
                outputs = self.forward(*args, latents=z, chunk_size=chunk_size, **kwargs)
                losses = loss(outputs)
                if not isinstance(losses, torch.Tensor) or losses.shape != (len(z),):
                    shape = (
                        tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
                    )
                    raise ValueError(
                        f"loss must return one value per latent, shape ({len(z)},), got {shape}"
                    )
                (gradient,) = torch.autograd.grad(losses.sum(), z, create_graph=create_graph)
                z = z - eta * gradient
                if not create_graph:
                    z = z.detach().requires_grad_(True)
        return z if create_graph else z.detach()

    def _step_sizes(self, step_size: float | torch.Tensor | None) -> float | torch.Tensor:
        """η of fit_latents: the given number or (d,) tensor, else the learned step sizes."""
        if step_size is None:
            if self.log_step_sizes is None:
                raise ValueError("pass step_size, or build the space with learn_step_sizes")
            return self.log_step_sizes.exp()  # (d,)
        if isinstance(step_size, torch.Tensor):
            if step_size.shape not in ((), (self.latent_dim,)):
                raise ValueError(
                    f"step_size must be a number or one per latent dimension ({self.latent_dim},),"
                    f" got shape {tuple(step_size.shape)}"
                )
            return step_size
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise TypeError(f"step_size must be a number or a tensor, got {type(step_size)}")
        return float(step_size)

    def midpoint_loss(
        self,
        loss: Callable[[Any], torch.Tensor],
        *args: Any,
        pairs: int = 1,
        among: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Path flattening (as NetSpace trains its space): the mean of `loss(outputs)` at
        `pairs` random points z = (1 - t) z_a + t z_b between random members a ≠ b (of `among`,
        e.g. the members of one task, whose data `args` are), t ~ U(0, 1), differentiable in
        the members' latents. Add it to the members' own losses."""
        pool = self._indices(among)
        if len(pool) < 2:
            raise ValueError("path flattening needs at least 2 members")
        first = torch.randint(len(pool), (pairs,), generator=generator)
        second = (first + torch.randint(1, len(pool), (pairs,), generator=generator)) % len(pool)
        a, b = pool[first], pool[second]
        t = torch.rand(pairs, 1, generator=generator, dtype=self.latents.dtype)  # on the CPU
        t, a, b = t.to(self.latents.device), a.to(self.latents.device), b.to(self.latents.device)
        between = (1 - t) * self.latents[a] + t * self.latents[b]  # (pairs, d)
        outputs = self.forward(*args, latents=between, **kwargs)  # (pairs, …)
        return torch.stack([loss(out) for out in outputs]).mean()

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike[str], *, allow_nonfinite: bool = False) -> Path:
        """A folder: space.safetensors (latents (N, d), the mapping's identity, and any
        learned base or step sizes) and space.json (config, member records, and the size and
        sha256 of the tensor file), committed whole under a lock (`mapnet.files.commit`). No
        pickle. NaN/inf in what it holds is a ValueError (`load` refuses them) unless
        `allow_nonfinite`."""
        folder = Path(path)
        _json_ready(self.members)
        tensors = {
            "latents": self.latents.detach().cpu().contiguous(),
            "identity": identity.encode(self.mapping.fingerprint()),
        }
        for index, base in enumerate(self.bases or []):
            tensors[f"base.{index}"] = base.detach().cpu().contiguous()
        if self.log_step_sizes is not None:
            tensors["log_step_sizes"] = self.log_step_sizes.detach().cpu().contiguous()
        nonfinite = [
            name for name, value in tensors.items() if name != "identity" and not _finite(value)
        ]
        if nonfinite and not allow_nonfinite:
            rows = (~torch.isfinite(tensors["latents"])).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"{nonfinite} hold NaN/inf (latent rows {rows[:5]}): ModelSpace.load would "
                "refuse the space, so it is not written; allow_nonfinite=True writes it anyway"
            )
        blob = save_safetensors(tensors)
        description = {
            "format": SPACE_FORMAT,
            "members": len(self),
            "latent_dim": self.latent_dim,
            "config": self.mapping.mapping_config.to_dict(),
            "target_class": self.mapping.target_class,
            # For readers; the full identity (per-tensor digests) in the tensor file is checked.
            "identity": identity.summary(self.mapping.fingerprint()),
            "torch_version": torch.__version__,
            "member_records": self.members,
            "learned_base": self.bases is not None,
            "learned_step_sizes": self.log_step_sizes is not None,
        }
        with files.commit(folder, DESCRIPTION_FILE, description) as staging:
            (staging / TENSOR_FILE).write_bytes(blob)
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: ModelSource | MappedModule) -> ModelSpace:
        """The space saved in `path`, on `model` (a factory or instance, as for `wrap`, or a
        MappedModule whose mapping must be the saved one). Every file is checked against the
        manifest before anything is parsed; then the description, the mapping's identity and
        every tensor's dtype, shape and finiteness. Every failure is a CheckpointError naming
        the file and what is wrong; a mapping that differs (seed, architecture, θ₀,
        projection) names the difference."""
        verified = files.read_verified(
            path, DESCRIPTION_FILE, what="a model space", legacy=_legacy_files
        )
        folder, description = verified.folder, verified.manifest
        json_file, tensor_file = folder / DESCRIPTION_FILE, folder / TENSOR_FILE
        _check_description(description, json_file, set(verified.contents))
        tensors = read_safetensors(verified.contents[TENSOR_FILE], tensor_file)
        if isinstance(model, MappedModule):
            mapping = model
        else:
            try:
                config = MappingConfig.from_dict(description["config"])
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{json_file}: invalid MappingConfig: {error}") from None
            mapping = wrap(model, config)
        if "identity" not in tensors:
            raise CheckpointError(f"{tensor_file} lacks the mapping's identity ('identity')")
        saved = identity.decode(tensors["identity"], str(tensor_file))
        identity.compare(saved, mapping.fingerprint(), str(folder))
        learned, stepped = description["learned_base"], description["learned_step_sizes"]
        size = sum(group.latent_dim for group in mapping.groups)
        shapes = {"identity": None, "latents": (description["members"], size)}
        shapes |= {f"base.{i}": tuple(mapping._base(i).shape) for i in range(len(mapping.groups))}
        shapes |= {"log_step_sizes": (size,)} if stepped else {}
        if not learned:
            shapes = {k: v for k, v in shapes.items() if not k.startswith("base.")}
        for name, shape in shapes.items():
            if shape is not None:
                _check_tensor(tensor_file, name, tensors.get(name), shape)
        unexpected = sorted(set(tensors) - set(shapes))
        if unexpected:
            raise CheckpointError(f"{tensor_file} holds tensors a space does not: {unexpected[:5]}")
        space = cls(
            mapping,
            latents=tensors["latents"],
            members=description["member_records"],
            learn_base=learned,
            learn_step_sizes=1.0 if stepped else None,
        )
        with torch.no_grad():
            if stepped:
                space.log_step_sizes.copy_(tensors["log_step_sizes"])  # type: ignore[union-attr]
            for index, base in enumerate(space.bases or []):
                base.copy_(tensors[f"base.{index}"])
        return space


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _legacy_files(file: Path, description: dict[str, Any]) -> dict[str, str | None]:
    """Format 1 holds the tensor file's sha256 instead of a files table."""
    if description.get("format") != 1:
        _check_format(description, file)
        raise CheckpointError(f"{file} has no {files.FILES!r} table of its folder's files")
    return {TENSOR_FILE: description.get("tensors_sha256")}


def _check_format(description: dict[str, Any], file: Path) -> None:
    version = description.get("format")
    if isinstance(version, bool) or version not in READABLE_FORMATS:
        raise CheckpointError(
            f"{file}: space format {version!r}, this mapnet reads "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )


def _check_description(description: dict[str, Any], file: Path, listed: set[str]) -> None:
    """Every field `load` reads, with its type, before any is used."""
    _check_format(description, file)
    if listed != {TENSOR_FILE}:
        raise CheckpointError(f"{file} lists {sorted(listed)}, a space holds {TENSOR_FILE} alone")
    description.setdefault("learned_base", False)  # format 1 spaces may predate both
    description.setdefault("learned_step_sizes", False)
    kinds = {
        "config": dict,
        "members": int,
        "member_records": list,
        "learned_base": bool,
        "learned_step_sizes": bool,
    }
    for name, kind in kinds.items():
        value = description.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(
                f"{file}: {name!r} is {type(value).__name__ if name in description else 'missing'}"
                f", expected a {kind.__name__}"
            )
    records, members = description["member_records"], description["members"]
    if members < 1 or len(records) != members or not all(isinstance(r, dict) for r in records):
        raise CheckpointError(
            f"{file}: {members} members but member_records holds {len(records)} entries, "
            "each a JSON object"
        )


def _check_tensor(file: Path, name: str, value: object, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{file} lacks the tensor {name!r}")
    if not value.is_floating_point():
        raise CheckpointError(f"{file}: {name!r} has dtype {value.dtype}, not a floating type")
    if tuple(value.shape) != shape:
        raise CheckpointError(
            f"{file}: {name!r} has shape {tuple(value.shape)}, this mapping's is {shape}"
        )
    if not _finite(value):
        raise CheckpointError(f"{file}: {name!r} holds NaN/inf values")


def _check_shareable(mapping: MappedModule) -> None:
    """A member must be its latent alone."""
    if not isinstance(mapping, MappedModule):
        raise TypeError(f"ModelSpace needs a MappedModule, got {type(mapping).__name__}")
    if mapping._layouts is not None:
        raise ValueError(
            "a ModelSpace generates each member's weights under vmap: row/column groups and "
            "groups_within_tensors are not supported (use an int group_size)"
        )
    direct = [spec.name for spec in mapping.selection.direct]
    if direct:
        raise ValueError(
            f"parameters trained directly ({direct[:3]}) would be shared by every member: a "
            "ModelSpace holds latents only (leave train_directly empty)"
        )
    statistics = [name for name, _ in mapping.target.named_buffers() if "running" in name]
    if statistics:
        raise ValueError(
            f"the target's running statistics ({statistics[:3]}) would be shared by every "
            "member: use normalisation without them (LayerNorm, GroupNorm, "
            "BatchNorm(track_running_stats=False))"
        )


def _json_ready(members: Iterable[dict[str, Any]]) -> None:
    try:
        json.dumps(list(members))
    except TypeError as error:
        raise ValueError(f"member records must be JSON values (labels, metrics): {error}") from None
