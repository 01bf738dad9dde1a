"""Generation's compiled passes (mapnet/projections/fused.py): the eager passes' bits, at one
and two threads, in every layout; the choice between them and its notice; torch.compile of the
caller and torch.func still work."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import mapnet
import mapnet.projections.structured as structured
from mapnet.projections import PiecewiseScale, StructuredProjection, fused
from mapnet_experiments.models.networks import CNN2

pytestmark = [
    pytest.mark.skipif(fused.cpp_compiler() is None, reason="no C++ compiler"),
    pytest.mark.filterwarnings("ignore::mapnet.projections.fused.GenerationNotice"),
]


@pytest.fixture(autouse=True)
def fusion_mode() -> Iterator[None]:
    yield
    fused.set_fusion(None)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _passes(proj: StructuredProjection, seed: int) -> list[torch.Tensor]:
    """Both passes in every form the generator calls them."""
    generator = torch.Generator().manual_seed(seed)
    rows = proj.out_features
    u = torch.randn(proj.in_features, generator=generator)
    offset = torch.randn(rows, generator=generator)
    sizes = [rows // 3, rows - rows // 3]
    pieces = [torch.randn(1, k, generator=generator) for k in sizes]
    weights = [torch.randn(k, generator=generator) for k in sizes]
    return [
        fused.matvec(proj, u, offset),
        fused.matvec(proj, u),
        fused.rmatvec_pieces(proj, pieces, sizes),
        fused.rmatvec_pieces(proj, pieces, sizes, weights),
        fused.rmatvec_pieces(proj, [None, pieces[1]], sizes),  # an unused tensor
    ]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("layout", ["row gains", "chunks", "signs", "segments"])
def test_compiled_passes_give_the_eager_bits(layout, threads, monkeypatch) -> None:
    rows, row_scale = 3001, torch.linspace(0.5, 2.0, 3001)
    if layout == "chunks":  # several column chunks, the last one overlapping
        monkeypatch.setattr(fused, "_CHUNK_BYTES", 4 * 64 * 8)  # 8 of B = 47 columns
    if layout in ("signs", "segments"):  # the int8 signs past PER_ROW_GAIN_MAX rows
        monkeypatch.setattr(structured, "PER_ROW_GAIN_MAX", 1000)
        sizes = (rows,) if layout == "signs" else (1000, rows - 1000)
        row_scale = PiecewiseScale(sizes, (1.25,) * len(sizes))
        if layout == "segments":
            row_scale = PiecewiseScale(sizes, (1.25, 0.5))
    proj = StructuredProjection(rows, 50, 4, row_scale)  # n = 64, B = 47
    assert (proj.gain is None) == (layout in ("signs", "segments"))
    fused.set_fusion("eager")
    eager = _passes(proj, seed=threads)
    fused.set_fusion("compiled")
    compiled = _passes(proj, seed=threads)
    assert fused.compiles(proj, torch.zeros(1))
    assert len(fused._chunks(proj)) == (6 if layout == "chunks" else 1)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


def _train(mapped: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = mapped(x)
    out.square().mean().backward()
    return out.detach(), mapped.latents[0].grad.clone()


@pytest.mark.slow
@pytest.mark.parametrize("update", ["additive", "multiplicative"])
def test_a_mapped_cnn2_trains_with_the_same_bits_compiled(update) -> None:
    """CNN2's 108,618 rows are above AUTO_MIN_ROWS: "auto" compiles them."""
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    config = mapnet.MappingConfig(latent_dim=256, latent_init_std=0.1, update=update)
    results = []
    for mode in ("eager", "auto"):
        fused.set_fusion(mode)
        mapped = mapnet.wrap(CNN2, config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(_train(mapped, x))
        notices = [w for w in caught if issubclass(w.category, fused.GenerationNotice)]
        assert len(notices) == (mode == "auto"), [str(w.message) for w in notices]
    assert fused.compiles(mapped.projections[0], x)
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_auto_compiles_only_large_groups_and_says_when_no_compiler(monkeypatch) -> None:
    small = StructuredProjection(1000, 16, 0, torch.ones(1000))
    large = StructuredProjection(fused.AUTO_MIN_ROWS, 16, 0, torch.ones(fused.AUTO_MIN_ROWS))
    u = torch.zeros(16)
    monkeypatch.setenv(fused.MODE_VARIABLE, "auto")
    assert not fused.compiles(small, u) and fused.compiles(large, u)
    fused.set_fusion("eager")
    assert not fused.compiles(large, u)
    fused.set_fusion("compiled")
    assert fused.compiles(small, u)
    fused.set_fusion(None)
    monkeypatch.setenv(fused.MODE_VARIABLE, "eager")
    assert not fused.compiles(large, u)
    monkeypatch.setenv(fused.MODE_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        fused.compiles(large, u)
    monkeypatch.setenv(fused.MODE_VARIABLE, "")  # empty: "auto"
    monkeypatch.setattr(fused, "cpp_compiler", lambda: None)
    fused.set_fusion("auto")  # the notice once more
    with pytest.warns(fused.GenerationNotice, match="needs a C\\+\\+ compiler"):
        assert not fused.compiles(large, u)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not every call
        assert not fused.compiles(large, u)


def test_torch_compile_and_torch_func_of_the_caller_use_the_eager_passes() -> None:
    """torch.compile of a mapped model traces the eager pass into its own graph; torch.func
    transforms run it wrapped: in both, the compiled kernels are not called."""
    fused.set_fusion("compiled")
    torch._dynamo.reset()
    mapped = mapnet.wrap(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), latent_dim=8)
    mapped.latents[0].data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    expected = mapped(x)
    explanation = torch._dynamo.explain(mapped)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(mapped, fullgraph=True)(x), expected)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mapped, {"latents.0": z}, (x,)).square().sum()

    z = mapped.latents[0].detach()
    forward, reverse = torch.func.jacfwd(loss)(z), torch.func.jacrev(loss)(z)
    torch.testing.assert_close(forward, reverse, rtol=1e-4, atol=1e-6)
    batch = torch.func.vmap(lambda z: torch.func.functional_call(mapped, {"latents.0": z}, (x,)))
    assert batch(torch.stack([z, 2 * z])).shape == (2, 4, 3)
    assert math.isfinite(loss(z).item())
