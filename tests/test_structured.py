"""Tests for mapnet.structured: the exact properties its docstring states, checked against a
materialised W on small sizes, plus gradients, loss helpers and bit-reproducibility."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from mapnet.projections import PiecewiseScale, structured
from mapnet.projections.structured import StructuredProjection, fwht

# (P, d) cases: n divides P, truncated last block, d not a power of two, P < d, d = 1.
SIZES = [(512, 128), (1536, 512), (1000, 100), (2500, 300), (300, 500), (7, 1), (96, 96)]


def make(p: int, d: int, seed: int = 0, row_scale: torch.Tensor | None = None):
    scale = torch.ones(p) if row_scale is None else row_scale
    return StructuredProjection(p, d, seed, scale)


def dense(proj: StructuredProjection) -> torch.Tensor:  # (P, d) float64
    return proj.double().to_dense()


def hadamard(n: int) -> torch.Tensor:  # (n, n) Sylvester order
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_is_the_sylvester_hadamard_and_its_own_inverse_up_to_n() -> None:
    x = torch.randn(3, 64, dtype=torch.float64)
    y = fwht(x.clone())  # (3, 64)
    torch.testing.assert_close(y, x @ hadamard(64).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(y.clone()), 64 * x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


def test_fwht_along_a_middle_axis_is_bit_identical_to_the_last_axis() -> None:
    """The (n, B) layout the projection uses changes where numbers live, not the arithmetic."""
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))  # (L, B, n)
    along_last = fwht(x.clone())
    along_middle = fwht(x.transpose(1, 2).contiguous(), dim=1)  # (L, n, B)
    assert torch.equal(along_middle.transpose(1, 2), along_last)
    # Strided views start at the input's own storage offset (a slice of a larger buffer).
    stack = torch.randn(3, 32, 5, generator=torch.Generator().manual_seed(2))
    assert stack[1].storage_offset() > 0
    expected = fwht(stack[1].clone(), dim=0)  # fwht consumes its input: transform a copy first
    assert torch.equal(fwht(stack[1], dim=0), expected)
    # A non-contiguous input is transformed as its contiguous copy would be.
    expected = fwht(stack[:, :, 2].contiguous(), dim=1)
    assert torch.equal(fwht(stack[:, :, 2], dim=1), expected)


@pytest.mark.parametrize(("p", "d"), SIZES)
def test_every_entry_has_the_same_magnitude(p: int, d: int) -> None:
    row_scale = 0.5 + torch.rand(p, generator=torch.Generator().manual_seed(1))
    w = dense(make(p, d, 3, row_scale))  # (P, d)
    expected = row_scale.double()[:, None] / math.sqrt(max(p, d))  # (P, 1)
    torch.testing.assert_close(w.abs(), expected.expand(p, d), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("p", "d"), SIZES)
def test_unit_columns_or_rows_and_exact_orthogonality_when_nothing_is_dropped(p: int, d: int):
    proj = make(p, d, 5)
    w = dense(proj)  # (P, d)
    n, blocks = proj.n, proj.blocks
    if p >= d:
        gram = w.T @ w  # (d, d)
        torch.testing.assert_close(
            gram.diagonal(), torch.ones(d, dtype=gram.dtype), rtol=0, atol=1e-6
        )
        off = gram - torch.diag(gram.diagonal())
        if p % n == 0:  # every block complete: WᵀW = I
            assert off.abs().max() <= 1e-6
        # The stated bound, and the spectral bound ‖W‖² ≤ Bn/P.
        assert off.abs().max() <= (blocks * n - p) / p + 1e-6
        assert torch.linalg.eigvalsh(gram).max() <= blocks * n / p + 1e-6
    else:
        rows = w @ w.T  # (P, P)
        torch.testing.assert_close(
            rows.diagonal(), torch.ones(p, dtype=rows.dtype), rtol=0, atol=1e-6
        )
        if d == n:
            torch.testing.assert_close(rows, torch.eye(p, dtype=rows.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("p", "d"), [(1000, 100), (2500, 300), (130, 3)])
def test_truncated_w_is_the_prefix_of_the_untruncated_one(p: int, d: int) -> None:
    """W(P) = √(Bn/P) · W(Bn)[:P], hence WᵀW = (Bn·I − RᵀR)/P with R the dropped ±1 rows."""
    proj = make(p, d, 11)
    full_size = proj.blocks * proj.n
    full = dense(make(full_size, d, 11))  # (Bn, d), complete blocks
    torch.testing.assert_close(full.T @ full, torch.eye(d, dtype=full.dtype), rtol=0, atol=1e-6)
    w = dense(proj)
    torch.testing.assert_close(w, full[:p] * math.sqrt(full_size / p), rtol=1e-6, atol=0)
    dropped = full[p:] * math.sqrt(full_size)  # (Bn - P, d) entries ±1
    torch.testing.assert_close(dropped.abs(), torch.ones_like(dropped), rtol=1e-6, atol=0)
    expected = (full_size * torch.eye(d, dtype=w.dtype) - dropped.T @ dropped) / p
    torch.testing.assert_close(w.T @ w, expected, rtol=0, atol=1e-6)


def test_each_block_is_exactly_orthogonal() -> None:
    """Block j maps u to H S_j u with S_j a signed injection: Q_jᵀ Q_j = n I, exactly."""
    proj = make(3000, 100).double()
    n = proj.n
    q = proj._blocks(torch.eye(100, dtype=torch.float64))  # (d, n, B): column i of every block
    gram = torch.einsum("inb,knb->bik", q, q)  # (B, d, d), integer-valued, so exact
    assert torch.equal(gram, n * torch.eye(100, dtype=torch.float64).expand_as(gram))
    u = torch.randint(-9, 10, (1, 100)).double()  # integers: every operation is exact
    energy = proj._blocks(u).square().sum(1)  # (1, B)
    assert torch.equal(energy, torch.full_like(energy, n * u.square().sum().item()))


def test_interleave_spreads_blocks_so_a_contiguous_run_is_not_isometric() -> None:
    """Each block carries exactly ‖u‖²/B, but a run of n consecutive outputs must not: the
    interleave spreads every block over all outputs (so over every layer)."""
    proj = make(64 * 128, 128)
    u = torch.randn(200, 128, generator=torch.Generator().manual_seed(0))
    u = u / u.norm(dim=1, keepdim=True)
    run = proj(u)[:, : proj.n].square().sum(1)  # (200,) energy of the first n outputs
    assert run.std() / run.mean() > 0.05
    comb = proj(u)[:, :: proj.blocks].square().sum(1)  # block 0's rows: exactly isometric
    torch.testing.assert_close(comb, torch.full_like(comb, 1 / proj.blocks), rtol=1e-5, atol=0)


def test_shapes_dtypes_and_batches() -> None:
    proj = make(1000, 100)
    assert (proj.out_features, proj.in_features) == (1000, 100)
    u = torch.randn(4, 100)
    y = proj(u[0])
    assert y.shape == (1000,) and y.dtype == torch.float32 and y.is_contiguous()
    batch = proj(u)  # (4, P)
    assert batch.shape == (4, 1000) and batch.is_contiguous()
    assert all(torch.equal(batch[i], proj(u[i])) for i in range(4))  # bit-identical rows
    assert proj(u.view(2, 2, 100)).shape == (2, 2, 1000)
    assert proj.adjoint(batch).shape == (4, 100)
    assert proj(u[0].double()).dtype == torch.float64
    assert proj.state_dict() == {}  # the seed regenerates everything
    with pytest.raises(ValueError, match=r"\(\.\.\., 100\)"):
        proj(torch.zeros(99))
    with pytest.raises(TypeError, match="floating"):
        proj(torch.zeros(100, dtype=torch.int64))


def test_forward_and_adjoint_match_the_materialised_matrix() -> None:
    row_scale = torch.linspace(0.1, 2.0, 5000)
    proj = make(5000, 1000, 2, row_scale)
    w = dense(proj)  # (P, d)
    u = torch.randn(3, 1000, dtype=torch.float64)
    g = torch.randn(3, 5000, dtype=torch.float64)
    torch.testing.assert_close(proj(u), u @ w.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(proj.adjoint(g), g @ w, rtol=0, atol=1e-12)
    proj32 = make(5000, 1000, 2, row_scale)
    torch.testing.assert_close(proj32(u[0].float()), (w @ u[0]).float(), rtol=0, atol=1e-5)


# torch.func.jvp itself triggers torch's own torch.jit.script deprecation warning.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_gradients() -> None:
    proj = make(300, 20, 4, torch.linspace(0.5, 1.5, 300)).double()
    u = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(proj, (u,))
    assert torch.autograd.gradgradcheck(proj, (u,))
    g = torch.randn(300, dtype=torch.float64)
    assert torch.autograd.gradcheck(proj.adjoint, (g.requires_grad_(),))
    (grad,) = torch.autograd.grad(proj(u) @ g.detach(), u)
    torch.testing.assert_close(grad, dense(proj).T @ g.detach(), rtol=0, atol=1e-12)
    # torch.func transforms (a JVP for Hutchinson, vmap over noise samples).
    v = torch.randn(20, dtype=torch.float64)
    _, tangent = torch.func.jvp(proj, (u.detach(),), (v,))
    torch.testing.assert_close(tangent, proj(v), rtol=0, atol=0)
    batch = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(proj)(batch), proj(batch), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_offset_is_added_in_the_pass_with_its_own_gradient() -> None:
    """offset + W u in one pass (θ₀ + W u without a second buffer), exact and differentiable in
    both inputs, under jvp and vmap too."""
    proj = make(300, 20, 4, torch.linspace(0.5, 1.5, 300)).double()
    u = torch.randn(20, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(300, dtype=torch.float64, requires_grad=True)
    assert torch.equal(proj(u, offset), proj(u) + offset)
    assert torch.autograd.gradcheck(proj, (u, offset))
    assert torch.autograd.gradgradcheck(proj, (u, offset))
    v, w = torch.randn(20, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    _, tangent = torch.func.jvp(proj, (u.detach(), offset.detach()), (v, w))
    torch.testing.assert_close(tangent, proj(v) + w, rtol=0, atol=1e-12)
    batch = torch.randn(5, 20, dtype=torch.float64)
    offsets = torch.randn(5, 300, dtype=torch.float64)
    fixed = offset.detach()
    torch.testing.assert_close(
        torch.func.vmap(lambda b: proj(b, fixed))(batch), proj(batch) + fixed, rtol=0, atol=0
    )
    torch.testing.assert_close(
        torch.func.vmap(proj)(batch, offsets), proj(batch) + offsets, rtol=0, atol=0
    )
    torch.testing.assert_close(
        torch.func.vmap(lambda o: proj(u.detach(), o))(offsets),
        proj(u.detach()) + offsets,
        rtol=0,
        atol=0,
    )
    with torch.autograd.forward_ad.dual_level():  # a tangent for one input only
        dual = torch.autograd.forward_ad.make_dual(offset.detach(), w)
        only_offset = torch.autograd.forward_ad.unpack_dual(proj(u.detach(), dual)).tangent
        dual = torch.autograd.forward_ad.make_dual(u.detach(), v)
        only_u = torch.autograd.forward_ad.unpack_dual(proj(dual, offset.detach())).tangent
    assert torch.equal(only_offset, w)
    torch.testing.assert_close(only_u, proj(v), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"offset must have shape \(300,\)"):
        proj(u, torch.zeros(299, dtype=torch.float64))


def test_autograd_saves_nothing() -> None:
    proj = make(4096, 256)
    saved: list[torch.Tensor] = []
    u = torch.randn(256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = proj(u)
    assert saved == []
    y.sum().backward()
    assert u.grad is not None and u.grad.shape == (256,)


def test_loss_helpers_match_the_materialised_matrix() -> None:
    for p, d in [(5000, 1000), (300, 500)]:
        row_scale = torch.linspace(-2.0, 3.0, p)
        proj = make(p, d, 8, row_scale)
        w = dense(make(p, d, 8, row_scale))  # (P, d)
        c = torch.rand(d, requires_grad=True)
        norms = proj.weighted_row_sq_norms(c)  # (P,)
        assert norms.shape == (p,)
        expected = w.square() @ c.detach().double()
        torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0)
        norms.sum().backward()  # the mapping loss differentiates through c = (1 + 2αz)²
        assert c.grad is not None
        sq = proj.column_sq_norms()  # (d,)
        assert sq.shape == (d,) and sq.dtype == torch.float32
        torch.testing.assert_close(sq.double(), w.square().sum(0), rtol=1e-5, atol=0)
        means = proj.column_means()  # (d,)
        assert means.shape == (d,) and means.dtype == torch.float32
        torch.testing.assert_close(means.double(), w.mean(0), rtol=1e-5, atol=1e-9)
        assert proj.column_means() is means  # cached: W is fixed
    with pytest.raises(ValueError, match=r"\(500,\)"):
        proj.weighted_row_sq_norms(torch.ones(499))


def test_a_gain_per_tensor_takes_three_bytes_per_output_past_the_threshold(monkeypatch) -> None:
    """Past PER_ROW_GAIN_MAX rows a PiecewiseScale (what mapnet.wrap builds) is kept as int8
    output signs and one float per segment: 2 (source) + 1 (sign) bytes per (block, slot)."""
    monkeypatch.setattr(structured, "PER_ROW_GAIN_MAX", 1000)
    p, d = 200_000, 2048
    proj = StructuredProjection(p, d, 0, PiecewiseScale((150_000, 50_000), (0.5, 2.0)))
    assert proj.gain is None and proj.signs.dtype == torch.int8
    assert sum(b.numel() * b.element_size() for b in proj.buffers()) <= 3 * (p + proj.n)


def test_memory_is_a_few_bytes_per_output_and_construction_is_fast() -> None:
    p, d = 200_000, 2048
    proj = make(p, d)
    buffers = {name: b for name, b in proj.named_buffers()}
    total = sum(b.numel() * b.element_size() for b in buffers.values())
    assert total <= 6 * (p + proj.n)  # 2 (signed source) + 4 (gain) per (block, slot)
    assert max(b.numel() for b in buffers.values()) < p + proj.n  # nothing P×d
    assert buffers["sources"].dtype == torch.int16
    # Past 2d + 1 = 32768 the source index needs 32 bits.
    assert make(40_000, 16_384).sources.dtype == torch.int32


def test_seed_determines_w() -> None:
    a, b, c = make(3000, 64, 1), make(3000, 64, 1), make(3000, 64, 2)
    u = torch.randn(64)
    assert torch.equal(a(u), b(u))
    assert not torch.equal(a(u), c(u))


def _fingerprint_case() -> tuple[StructuredProjection, torch.Tensor, torch.Tensor]:
    p, d = 100_003, 300
    row_scale = 0.5 + (torch.arange(p) % 7).float() / 7
    u = ((torch.arange(d) * 37) % 101 - 50).float() / 50  # exact float32 values, no RNG
    g = ((torch.arange(p) * 13) % 29 - 14).float() / 14
    return StructuredProjection(p, d, 7, row_scale), u, g


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_pinned_fingerprint() -> None:
    """W u pins W: a change there changes every seeded W, a breaking change for saved latents
    (unchanged since W was defined). The tables' layout and the adjoint's order of additions
    are implementation details, pinned so that they change only on purpose."""
    proj, u, g = _fingerprint_case()
    assert _sha(proj(u)) == "dc3e8e802f0eca4faa03fe9f07bdb472a4cc421e920786692ead126fbd9ebba2"
    tables = torch.cat([t.reshape(-1).view(torch.uint8) for t in proj.buffers()])
    assert _sha(tables) == "dc3345aa2a4ec6e62a9f7d981b33ae0aa04fd462629c668324e2a5ec50882610"
    assert _sha(proj.adjoint(g)) == (
        "c8afe6e6f5d2e9aba688a63393d45178d32dec04d14540307ca1d6ec5f9dc892"
    )


def test_same_bytes_with_one_thread_in_another_process() -> None:
    script = textwrap.dedent(
        """
        import hashlib, torch
        torch.set_num_threads(1)
        from mapnet.projections.structured import StructuredProjection
        p = StructuredProjection(300_000, 512, 3, torch.linspace(0.5, 2.0, 300_000))
        u = torch.sin(torch.arange(512, dtype=torch.float32))
        g = torch.cos(torch.arange(300_000, dtype=torch.float32))
        for t in (p(u), p(torch.stack([u, 2 * u])), p.adjoint(g)):
            print(hashlib.sha256(t.numpy().tobytes()).hexdigest())
        """
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = StructuredProjection(300_000, 512, 3, torch.linspace(0.5, 2.0, 300_000))
        u = torch.sin(torch.arange(512, dtype=torch.float32))
        g = torch.cos(torch.arange(300_000, dtype=torch.float32))
        here = [_sha(t) for t in (p(u), p(torch.stack([u, 2 * u])), p.adjoint(g))]
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == here


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 10, 0, torch.ones(0)), ValueError, "out_features must be > 0"),
        ((-3, 10, 0, torch.ones(3)), ValueError, "out_features must be > 0"),
        ((10, 0, 0, torch.ones(10)), ValueError, "in_features must be > 0"),
        ((10, 4, 0, torch.ones(11)), ValueError, r"row_scale must have shape \(10,\)"),
        ((10, 4, 0, torch.ones(10, 1)), ValueError, r"row_scale must have shape \(10,\)"),
        ((10, 4, -1, torch.ones(10)), ValueError, "seed"),
        ((10.0, 4, 0, torch.ones(10)), TypeError, "out_features must be an int"),
        ((10, True, 0, torch.ones(10)), TypeError, "in_features must be an int"),
        ((10, 4, 0, [1.0] * 10), TypeError, "row_scale must be a tensor"),
    ],
)
def test_bad_arguments(args: tuple, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        StructuredProjection(*args)


@pytest.mark.parametrize("p, d", [(5000, 64), (300, 512), (6_000_000, 8)])
def test_piecewise_scale_gives_the_same_bits_as_its_dense_gain(p: int, d: int, monkeypatch) -> None:
    """A gain kept per segment generates W u and Wᵀ g bit-identical to the same gain per row,
    whether or not the gradient's pieces align with the segments; 6M rows take the in-place
    transform."""
    monkeypatch.setattr(structured, "PER_ROW_GAIN_MAX", 100)
    sizes = (p // 3, p - p // 3 - 7, 7)
    scale = PiecewiseScale(sizes, (0.25, 1.5, -3.0))
    piecewise = StructuredProjection(p, d, 4, scale)
    per_row = StructuredProjection(p, d, 4, scale.dense())
    assert piecewise.gain is None and per_row.signs is None
    u = torch.sin(torch.arange(d, dtype=torch.float32))
    g = torch.cos(torch.arange(p, dtype=torch.float32))
    offset = torch.linspace(-1, 1, p)
    assert torch.equal(piecewise(u, offset), per_row(u, offset))
    assert torch.equal(piecewise.adjoint(g), per_row.adjoint(g))
    pieces = list(g.split(sizes))
    aligned = piecewise._rmatvec_pieces([x[None] for x in pieces], sizes)
    other = [g[: p // 2][None], g[p // 2 :][None]]
    assert torch.equal(aligned, per_row._rmatvec_pieces([x[None] for x in pieces], sizes))
    assert torch.equal(aligned, piecewise._rmatvec_pieces(other, [p // 2, p - p // 2]))
    torch.testing.assert_close(piecewise.row_gains(), per_row.row_gains(), rtol=0, atol=0)


def test_large_transforms_run_in_place_with_the_same_bits() -> None:
    """Past 2^22 numbers fwht works in its input's storage; per column the arithmetic is the same
    as the two-buffer path, which the narrow slices (below the threshold) take."""
    x = torch.randn(1, 1024, 4200, generator=torch.Generator().manual_seed(0))  # 4.3M numbers
    expected = torch.cat(
        [fwht(x[:, :, i : i + 600].clone(), dim=1) for i in range(0, 4200, 600)], 2
    )
    work = x.clone()
    result = fwht(work, dim=1)
    assert result.data_ptr() == work.data_ptr()  # no second buffer
    assert torch.equal(result, expected)


def test_two_threads_sharing_a_projection_get_their_own_results() -> None:
    """The passes keep no state between calls (an inference server shares one module)."""
    import sys
    import threading

    proj = make(3000, 100, 7)
    inputs = [torch.randn(3, 100, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [proj(u).clone() for u in inputs]
    wrong = [0]

    def run(i: int) -> None:
        for _ in range(200):
            wrong[0] += not torch.equal(proj(inputs[i]), expected[i])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside the passes
    try:
        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong[0] == 0
