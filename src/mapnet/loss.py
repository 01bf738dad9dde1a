"""The Mapping Loss (paper §2.3, eq. 26–30): the task loss plus three regularisers of the map.

    L = L_task + λ₁ L_stab + λ₂ L_smooth + λ₃ L_align          λ trainable (or fixed, for ablations)

    L_stab   = mean_batch ‖f(x; G(z+ε)) − f(x; G(z))‖²         ε ~ N(0, σ²I), squared norm over the
                                                               output dims (eq. 28)
    L_smooth = Σ_groups ‖∂G/∂z‖_F² / P                         P = all generated parameters (eq. 29)
    L_align  = mean_groups 1 − cos(z, w̄),  w̄_i = (1 + α z_i) mean_p W_pi                  (eq. 30)
               (‖z‖ in the cosine floored, see `alignment_floor`)

Usage (the optimiser must see both the latents and the coefficients):

    loss_fn = MappingLoss(mapped)
    optimizer = torch.optim.Adam([*mapped.parameters(), *loss_fn.parameters()], lr=1e-2)
    out = loss_fn(x, y)
    out.total.backward()
    accuracy = (out.outputs.argmax(1) == y).float().mean()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mapnet.checks import positive_int
from mapnet.config import ACTIVATIONS
from mapnet.module import MappedModule
from mapnet.projections.seeding import derive_seed

TERMS = ("stability", "smoothness", "alignment")
TASK_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
}
ESTIMATORS = ("auto", "exact", "hutchinson")
COEFFICIENTS = ("uncertainty", "fixed")


@dataclass
class LossOutput:
    """One evaluation of the Mapping Loss.

    total: the scalar to backpropagate (task + weighted terms + coefficient regularisers).
    values: detached floats for logging: "total", "task", each enabled term, and "lambda_<term>"
        (its effective coefficient λ).
    outputs: the mapped model's outputs on the inputs (with graph), e.g. for accuracy.
    """

    total: torch.Tensor
    values: dict[str, float] = field(default_factory=dict)
    outputs: Any = None


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class MappingLoss(nn.Module):
    """L = L_task + Σ_k λ_k L_k over the enabled terms k ∈ {stability, smoothness, alignment}.

    mapped: the MappedModule being trained. It is used, not owned: `parameters()` and
        `state_dict()` of the loss hold only its own coefficients (and noise generator state).
    task_loss: "cross_entropy", "mse", or a callable (outputs, targets) -> scalar.
    stability, smoothness, alignment: switch each term on or off; all off gives exactly L_task.
    stability_sigma: std σ of the latent noise ε. With scaling="init_std" one unit of rms(u) is one
        init-std of every weight, so σ = 1e-2 moves each generated weight by ~1% of its init-std.
    stability_samples: noisy forwards per step (each costs one extra forward and backward).
    smoothness_estimator: "exact" is the closed form of the one-layer mapping,
        ‖J‖_F² = Σ_p σ'(a_p)² Σ_i W_pi² (1+2αz_i)² (identity σ: Σ_i ‖W_:i‖² (1+2αz_i)², O(d) with
        cached column norms); "hutchinson" is E_w ‖Jᵀw‖² with Rademacher w (E[wwᵀ] = I) by
        VJPs of generate_flat (any mapping); "auto" is exact whenever every projection exposes
        `weighted_row_sq_norms`. Either way the value is divided by the total number P of
        generated parameters (the mean squared sensitivity of one parameter to the latents), and
        is differentiable in z.
    hutchinson_samples: probe vectors per step for the Hutchinson estimator.
    coefficients: "uncertainty" (trainable, see below) or "fixed" (constant λ, for ablations).
    weights: {term: λ}: the constant λ with "fixed" (default 1), the initial λ with "uncertainty".
    alignment_floor: r in cos(z, w̄) = z·w̄ / (‖w̄‖ √(‖z‖² + d r²)); 0 is the paper's exact
        cosine. The cosine is scale-invariant in z, so its gradient grows like 1/‖z‖, and our z
        starts at (or near) 0: unfloored, the alignment term overrides the task in the first
        steps (measured on a small MLP: training stalls). r = 1, the rms of the paper-literal latent
        z ~ N(0, I), caps the gradient through z's direction at 1/(r√d), its size at that scale.
    max_weight: "uncertainty" only: the largest λ any term can settle at (1/ε below). The default
        1 lets no term weigh more than the task loss (which has weight 1 in eq. 26); at 100 the
        small stability and smoothness terms got λ ≈ 15 and slowed training on a small MLP.
    seed: seeds the loss's own generator (latent noise, Hutchinson probes); None derives it from
        the mapping's seed. Its state is saved in state_dict(), so a resumed run draws the same
        noise as an uninterrupted one.

    Trainable coefficients are uncertainty weights (Kendall et al. 2018) with a variance floor:
    term_k = exp(−s_k)(L_k + ε) + s_k, s_k trainable, ε = 1/max_weight, λ_k = exp(−s_k).
    Minimising over s_k gives λ_k = 1/(L_k + ε), which is never 0 for a finite L_k (naive
    descent on λ·L would drive λ to 0) and never above 1/ε even when L_k → 0; unlike a clamp on
    s_k, the floor keeps the gradient on s_k alive everywhere, so λ_k can always move back.
    """

    def __init__(
        self,
        mapped: MappedModule,
        task_loss: str | Callable[[Any, Any], torch.Tensor] = "cross_entropy",
        *,
        stability: bool = True,
        smoothness: bool = True,
        alignment: bool = True,
        stability_sigma: float = 1e-2,
        stability_samples: int = 1,
        smoothness_estimator: str = "auto",
        hutchinson_samples: int = 4,
        coefficients: str = "uncertainty",
        weights: Mapping[str, float] | None = None,
        alignment_floor: float = 1.0,
        max_weight: float = 1.0,
        seed: int | None = None,
    ):
        super().__init__()
        if not isinstance(mapped, MappedModule):
            raise TypeError(f"mapped must be a MappedModule, got {type(mapped).__name__}")
        # Not a submodule: the latents must not appear in loss.parameters() (the optimiser would
        # see them twice) nor the target in loss.state_dict().
        object.__setattr__(self, "mapped", mapped)

        if isinstance(task_loss, str):
            if task_loss not in TASK_LOSSES:
                raise ValueError(
                    f"task_loss={task_loss!r} is not one of {', '.join(map(repr, TASK_LOSSES))} "
                    "(or pass a callable (outputs, targets) -> scalar)"
                )
            self.task_loss_name = task_loss
            self.task_loss = TASK_LOSSES[task_loss]
        elif callable(task_loss):
            self.task_loss_name = getattr(task_loss, "__name__", type(task_loss).__name__)
            self.task_loss = task_loss
        else:
            raise TypeError(f"task_loss must be a string or a callable, got {task_loss!r}")

        switches = {"stability": stability, "smoothness": smoothness, "alignment": alignment}
        for name, on in switches.items():
            if not isinstance(on, bool):
                raise TypeError(f"{name} must be True or False, got {on!r}")
        self.terms = tuple(t for t in TERMS if switches[t])

        self.stability_sigma = _finite_number("stability_sigma", stability_sigma)
        if self.stability_sigma <= 0:
            raise ValueError(
                f"stability_sigma must be > 0, got {stability_sigma} (switch the term off with "
                "stability=False)"
            )
        self.stability_samples = positive_int("stability_samples", stability_samples)
        self.hutchinson_samples = positive_int("hutchinson_samples", hutchinson_samples)

        if smoothness_estimator not in ESTIMATORS:
            raise ValueError(
                f"smoothness_estimator={smoothness_estimator!r} is not one of "
                f"{', '.join(map(repr, ESTIMATORS))}"
            )
        # The closed form is derived for θ = σ(θ₀ + W u) (§2.3); a multiplicative fine-tuning
        # update θ_pre ⊙ (1 + m) goes through Hutchinson's estimator on generate_flat.
        additive = mapped.mapping_config.update == "additive"
        closed_form = additive and all(
            hasattr(p, "weighted_row_sq_norms") for p in mapped.projections
        )
        if smoothness_estimator == "exact" and not closed_form:
            raise ValueError(
                "smoothness_estimator='exact' needs an additive update and projections with "
                "weighted_row_sq_norms(); use 'hutchinson' or 'auto'"
            )
        if smoothness_estimator == "auto":
            smoothness_estimator = "exact" if closed_form else "hutchinson"
        self.smoothness_estimator = smoothness_estimator

        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"coefficients={coefficients!r} is not one of {', '.join(map(repr, COEFFICIENTS))}"
            )
        self.coefficients = coefficients
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"weights for unknown term(s) {unknown}; the terms are {list(TERMS)}")
        for term, value in weights.items():
            value = _finite_number(f"weights[{term!r}]", value)
            if value < 0 or (coefficients == "uncertainty" and value == 0):
                bound = "> 0 (an initial λ)" if coefficients == "uncertainty" else ">= 0"
                raise ValueError(f"weights[{term!r}] must be {bound}, got {value}")
        self.alignment_floor = _finite_number("alignment_floor", alignment_floor)
        if self.alignment_floor < 0:
            raise ValueError(f"alignment_floor must be >= 0, got {alignment_floor}")
        self.max_weight = _finite_number("max_weight", max_weight)
        if self.max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")

        device = mapped.latents[0].device
        self.fixed_weights = {t: float(weights.get(t, 1.0)) for t in self.terms}
        self.log_variances = nn.ParameterDict()
        if coefficients == "uncertainty":
            for term in self.terms:
                s0 = -math.log(self.fixed_weights[term])
                self.log_variances[term] = nn.Parameter(torch.tensor(s0, device=device))

        if seed is None:
            seed = derive_seed(mapped.mapping_config.seed, "mapping-loss")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)

        # W's column statistics are read from the projections, which cache them until their
        # gains change (a loaded state with stored bases can change them).

    # ---------------------------------------------------------------- the terms

    def stability_loss(
        self, args: tuple[Any, ...], clean: torch.Tensor, rng: _RngState | None = None
    ) -> torch.Tensor:
        """mean_batch ‖f(x; G(z+ε)) − f(x; G(z))‖², averaged over `stability_samples` draws of ε.

        `clean` are the outputs f(*args; G(z)) (gradient flows through both branches). Buffers
        are passed as clones, so BatchNorm running statistics are updated once per step (by the
        clean pass). `rng`, the global RNG state captured before the clean pass (forward() does
        this), is replayed, so dropout draws the clean pass's masks.
        """
        if not isinstance(clean, torch.Tensor):
            raise TypeError(
                "the stability term needs tensor outputs, the model returned "
                f"{type(clean).__name__}"
            )
        mapped = self.mapped
        params_names = {alias for spec in mapped.specs for alias in spec.names}
        total = clean.new_zeros(())
        for _ in range(self.stability_samples):
            noisy = []
            for z in mapped.latents:
                eps = torch.randn(z.shape, generator=self.generator) * self.stability_sigma
                noisy.append(z + eps.to(device=z.device, dtype=z.dtype))
            tensors: dict[str, torch.Tensor] = {
                name: buffer.clone()
                for name, buffer in mapped.target.named_buffers(remove_duplicate=False)
                if name not in params_names
            }
            tensors.update(mapped.generate(noisy))
            with rng.replay() if rng is not None else nullcontext():
                perturbed = functional_call(mapped.target, tensors, args)
            squared = (perturbed - clean).square()  # (B, ...)
            per_example = squared.flatten(1).sum(1) if squared.dim() > 1 else squared  # (B,)
            total = total + per_example.mean()
        return total / self.stability_samples

    def smoothness_loss(self) -> torch.Tensor:
        """Σ_groups ‖∂G/∂z‖_F² / P, by the closed form or by Hutchinson (class docstring)."""
        mapped = self.mapped
        total = None
        for index, z in enumerate(mapped.latents):
            if self.smoothness_estimator == "exact":
                value = self._exact_jacobian_sq_norm(index, z)
            else:
                value = self._hutchinson_jacobian_sq_norm(index, z)
            total = value if total is None else total + value
        assert total is not None
        return total / mapped.num_generated_parameters()

    def _exact_jacobian_sq_norm(self, index: int, z: torch.Tensor) -> torch.Tensor:
        # J = diag(σ'(a)) W diag(1 + 2αz): the modulation's derivative scales column i.
        mapped = self.mapped
        projection = mapped.projections[index]
        c = (1 + 2 * mapped.mapping_config.alpha * z).square()  # (d,)
        activation = mapped.mapping_config.activation
        if activation == "identity":
            column_sq = getattr(projection, "column_sq_norms", None)
            column_sq = column_sq() if column_sq is not None else None
            if column_sq is not None:
                return (column_sq.to(c.dtype) * c).sum()
            return projection.weighted_row_sq_norms(c).sum()
        a = mapped.pre_activation(index, z)  # (P_g,)
        # σ is elementwise, so the gradient of Σσ(a) is σ'(a); create_graph keeps it
        # differentiable in a (hence in z) for the outer backward.
        with torch.enable_grad():  # also under no_grad (evaluation)
            point = a if a.requires_grad else a.detach().requires_grad_()
            (slope,) = torch.autograd.grad(
                ACTIVATIONS[activation](point).sum(), point, create_graph=True
            )
        return (slope.square() * projection.weighted_row_sq_norms(c.to(a.dtype))).sum()

    def _hutchinson_jacobian_sq_norm(self, index: int, z: torch.Tensor) -> torch.Tensor:
        # E_w ‖Jᵀw‖² = ‖J‖_F² for Rademacher w ∈ {±1}^P. Reverse mode (a VJP per probe, with
        # create_graph so the estimate is differentiable in z) rather than forward mode: only the
        # backward of a projection is guaranteed to be differentiable (the structured projection's
        # JVP rule is not, and vmap cannot batch its passes), and on the dense one a loop of
        # VJPs measured 5x faster than vmap over JVPs (CNN2, d = 2048, 4 probes).
        mapped = self.mapped
        with torch.enable_grad():  # also under no_grad (evaluation): the estimate needs J
            latent = z if z.requires_grad else z.detach().requires_grad_()
            theta = mapped.generate_flat(index, latent)  # (P_g,)
            total = theta.new_zeros(())
            for _ in range(self.hutchinson_samples):
                signs = torch.randint(0, 2, theta.shape, generator=self.generator, dtype=torch.int8)
                probe = (2 * signs - 1).to(device=theta.device, dtype=theta.dtype)  # (P_g,)
                (jtw,) = torch.autograd.grad(
                    theta, latent, grad_outputs=probe, create_graph=True, retain_graph=True
                )  # (d,)
                total = total + jtw.square().sum()
        return total / self.hutchinson_samples

    def alignment_loss(self) -> torch.Tensor:
        """mean_groups 1 − cos(z, w̄), w̄_i = (1 + α z_i) mean_p W_pi (‖z‖ floored)."""
        mapped = self.mapped
        total = None
        for index, z in enumerate(mapped.latents):
            means = mapped.projections[index].column_means().to(z.dtype)  # (d,)
            w = (1 + mapped.mapping_config.alpha * z) * means  # (d,)
            z_norm = torch.sqrt(z.square().sum() + z.numel() * self.alignment_floor**2)
            denominator = (z_norm * w.norm()).clamp_min(torch.finfo(w.dtype).tiny)
            value = 1 - (z @ w) / denominator
            total = value if total is None else total + value
        assert total is not None
        return total / len(mapped.latents)

    # ---------------------------------------------------------------- coefficients

    def weight(self, term: str) -> torch.Tensor | float:
        """The effective λ of an enabled term (a tensor when trainable)."""
        if self.coefficients == "fixed":
            return self.fixed_weights[term]
        return torch.exp(-self.log_variances[term])

    def _weighted(self, term: str, value: torch.Tensor) -> torch.Tensor:
        if self.coefficients == "fixed":
            return self.fixed_weights[term] * value
        s = self.log_variances[term]
        return torch.exp(-s) * (value + 1.0 / self.max_weight) + s

    def num_trainable_parameters(self) -> int:
        """The trainable coefficients: count them in the run's trainable total."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---------------------------------------------------------------- forward

    def forward(self, inputs: Any, targets: Any) -> LossOutput:
        """The Mapping Loss on one batch; `inputs` is the model's input (a tuple for several)."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        rng = _RngState.capture(args)
        outputs = self.mapped(*args)
        task = self.task_loss(outputs, targets)
        total = task
        values: dict[str, float] = {"task": task.item()}
        for term in self.terms:
            if term == "stability":
                value = self.stability_loss(args, outputs, rng)
            elif term == "smoothness":
                value = self.smoothness_loss()
            else:
                value = self.alignment_loss()
            total = total + self._weighted(term, value)
            values[term] = value.item()
            weight = self.weight(term)
            values[f"lambda_{term}"] = float(weight.detach() if torch.is_tensor(weight) else weight)
        values["total"] = total.item()
        return LossOutput(total=total, values=values, outputs=outputs)

    # The noise generator's state travels with state_dict(), as a tensor (safetensors-friendly).
    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.to(device="cpu", dtype=torch.uint8))

    def extra_repr(self) -> str:
        return (
            f"task={self.task_loss_name}, terms={list(self.terms)}, "
            f"coefficients={self.coefficients}, sigma={self.stability_sigma}, "
            f"smoothness_estimator={self.smoothness_estimator}"
        )


@dataclass
class _RngState:
    """The global RNG state before the clean forward, to replay it for the noisy forwards."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def capture(cls, args: tuple[Any, ...]) -> _RngState:
        devices = {a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda}
        return cls(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in devices})

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run from the captured state; the global RNG is restored on exit (as if never used)."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for index, state in self.cuda.items():
                torch.cuda.set_rng_state(state, index)
            yield
