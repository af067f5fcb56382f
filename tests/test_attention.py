"""Self-attention routing (Efficient-CapsNet): exp_squash, attention_routing and
capsule_attention_routing on every backend that has them, against fastcaps.reference (which
forms the whole Nin x Nin attention matrix) in value and every gradient."""

import itertools
import math

import pytest
import torch

import fastcaps
from conftest import (
    CUDA,
    SHAPES,
    TRITON,
    TRITON_DEVICE,
    TRITON_PATHS,
    Shape,
    as_float64_leaf,
    assert_close,
    backend_params,
    grads,
    make_layer_inputs,
    saved_state,
    skip_cpu_triton_beside_a_gpu,
)
from fastcaps import reference

BACKEND_DTYPES = [("torch", torch.float64), ("torch", torch.float32), ("torch", torch.bfloat16)]
# the interpreter has no half-precision arithmetic: half precision on CUDA only
TRITON_DTYPES = [("triton", torch.float64), ("triton", torch.float32)] + (
    [("triton", torch.float16), ("triton", torch.bfloat16)] if CUDA else []
)


ALL = backend_params(BACKEND_DTYPES + TRITON_DTYPES)
FLOAT64 = backend_params([("torch", torch.float64), ("triton", torch.float64)])


ATTENTION_SHAPES = [*SHAPES, Shape(3, 16, 10, 16, 8)]  # + Efficient-CapsNet's layer


def make_prior(shape: Shape, dtype, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prior = 0.3 * torch.randn(shape.Nin, shape.Nout, generator=g, dtype=torch.float64)
    return prior.to(device=device, dtype=dtype).requires_grad_()


def check_layer(backend, u, weight, prior, dtype, what=""):
    """capsule_attention_routing and attention_routing on ``backend`` match the float64
    reference in value and in the gradient of every input."""
    v = fastcaps.capsule_attention_routing(u, weight, prior, backend=backend)
    wide = [as_float64_leaf(t) for t in (u, weight, prior)]
    v_ref = reference.capsule_attention_routing(*wide)
    assert v.dtype == u.dtype and v.shape == v_ref.shape
    assert_close(v, v_ref, dtype, f"{what} v")
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    names = ("u", "weight", "prior")
    for name, g, e in zip(names, grads(v, (u, weight, prior), grad_v.to(v.device)),
                          grads(v_ref, wide, grad_v), strict=False):  # fmt: skip
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"{what} grad {name}")

    u_hat = reference.predictions(u.detach(), weight.detach()).requires_grad_()
    v = fastcaps.attention_routing(u_hat, prior, backend=backend)
    u_hat64, prior64 = as_float64_leaf(u_hat), as_float64_leaf(prior)
    v_ref = reference.attention_routing(u_hat64, prior64)
    assert_close(v, v_ref, dtype, f"{what} attention_routing v")
    for name, g, e in zip(("u_hat", "prior"), grads(v, (u_hat, prior), grad_v.to(v.device)),
                          grads(v_ref, (u_hat64, prior64), grad_v), strict=False):  # fmt: skip
        assert_close(g, e, dtype, f"{what} attention_routing grad {name}")


@pytest.mark.parametrize("with_prior", [False, True], ids=["noprior", "prior"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_attention_routing_matches_reference(on_device, backend, dtype, shape, with_prior):
    u, weight, _ = make_layer_inputs(shape, dtype, on_device, bias=False)
    prior = make_prior(shape, dtype, on_device) if with_prior else None
    check_layer(backend, u, weight, prior, dtype)


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("with_prior", [False, True], ids=["noprior", "prior"])
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_tiling_paths_match_reference(device, path, with_prior):
    """Small shapes forced through every tiling the large ones take (slices, sample blocks,
    batch chunks, stored or recomputed coefficients, chunked parents)."""
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.triton_launch import override_routing_plan

    shape = Shape(20, 13, 3, 5, 3)  # 20 samples: two blocks of 16
    u, weight, _ = make_layer_inputs(shape, torch.float64, device, bias=False)
    prior = make_prior(shape, torch.float64, device) if with_prior else None
    with override_routing_plan(**TRITON_PATHS[path]):
        check_layer("triton", u, weight, prior, torch.float64, path)


def test_reference_is_the_papers_formula():
    """The reference against a loop over every (sample, child, parent), written from the paper:
    a_ij = sum_k u_ij . u_kj / sqrt(D), c = softmax over j + prior, v = exp_squash(sum_i c u)."""
    g = torch.Generator().manual_seed(3)
    u_hat = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    prior = torch.randn(4, 3, generator=g, dtype=torch.float64)
    batch, n_in, n_out, d = u_hat.shape
    expected = torch.zeros(batch, n_out, d, dtype=torch.float64)
    for b in range(batch):
        a = torch.zeros(n_in, n_out, dtype=torch.float64)
        for i, j, k in itertools.product(range(n_in), range(n_out), range(n_in)):
            a[i, j] += torch.dot(u_hat[b, i, j], u_hat[b, k, j]) / math.sqrt(d)
        c = torch.exp(a) / torch.exp(a).sum(dim=1, keepdim=True) + prior
        for j in range(n_out):
            s = sum(c[i, j] * u_hat[b, i, j] for i in range(n_in))
            expected[b, j] = (1 - torch.exp(-s.norm())) * s / s.norm()
    torch.testing.assert_close(reference.attention_routing(u_hat, prior), expected)


@pytest.mark.parametrize("dim", [-1, 0, 1], ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("backend,dtype", ALL)
def test_exp_squash_matches_reference(on_device, backend, dtype, dim):
    device = on_device
    g = torch.Generator().manual_seed(7)
    s64 = torch.randn(5, 7, 13, generator=g, dtype=torch.float64) * 2
    s64[1, 2] = 0  # a zero vector (along the last dim)
    s64[2] *= 0.01  # norms on both sides of the kernels' series / exponential switch at 0.5
    s = s64.to(device=device, dtype=dtype).requires_grad_()
    v = fastcaps.exp_squash(s, dim=dim, backend=backend)
    s_ref = as_float64_leaf(s)
    v_ref = reference.exp_squash(s_ref, dim=dim)
    assert v.dtype == dtype and v.shape == s.shape
    assert_close(v, v_ref, dtype, "v")
    grad_v = torch.randn(v.shape, generator=g, dtype=torch.float64)
    (gs,) = grads(v, (s,), grad_v.to(device))
    (gs_ref,) = grads(v_ref, (s_ref,), grad_v)
    assert torch.isfinite(gs).all()
    assert_close(gs, gs_ref, dtype, "grad s")


@pytest.mark.parametrize("backend,dtype", ALL)
def test_exp_squash_is_exact_at_every_norm(on_device, backend, dtype):
    """Norms across the Triton kernel's switch from its series (|s| < 0.5) to 1 - exp(-|s|),
    against the float64 reference (``expm1``): float64 to 1e-14, the others to their table."""
    norms = [1e-30, 1e-8, 1e-3, 0.1, 0.3, 0.45, 0.4999, 0.5, 0.5001, 0.7, 1, 3, 10, 50, 1e10, 1e30]
    g = torch.Generator().manual_seed(12)
    directions = torch.randn(len(norms), 7, generator=g, dtype=torch.float64)
    s64 = directions / directions.norm(dim=-1, keepdim=True) * torch.tensor(norms)[:, None]
    s = s64.to(device=on_device, dtype=dtype).requires_grad_()
    v = fastcaps.exp_squash(s, backend=backend)
    s_ref = as_float64_leaf(s)
    v_ref = reference.exp_squash(s_ref)
    grad_v = torch.randn(s.shape, generator=g, dtype=torch.float64)
    (gs,) = grads(v, (s,), grad_v.to(on_device))
    (gs_ref,) = grads(v_ref, (s_ref,), grad_v)
    if dtype == torch.float64:
        torch.testing.assert_close(v.cpu(), v_ref, rtol=1e-14, atol=1e-300)
        torch.testing.assert_close(gs.cpu(), gs_ref, rtol=1e-13, atol=1e-300)
    else:
        assert_close(v, v_ref, dtype, "v")
        assert_close(gs, gs_ref, dtype, "grad s")


@pytest.mark.parametrize(
    "backend",
    ["reference", "torch",
     pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton"))],
)  # fmt: skip
def test_exp_squash_at_zero_and_at_extreme_norms(backend):
    """0 with an identity Jacobian at s = 0; finite and right for tiny and huge norms (triton on
    the GPU when present, else under the interpreter)."""
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    zero = torch.zeros(4, dtype=torch.float64, device=device)
    jacobian = torch.autograd.functional.jacobian(
        lambda x: fastcaps.exp_squash(x, backend=backend), zero
    )
    assert torch.equal(fastcaps.exp_squash(zero, backend=backend), zero)
    torch.testing.assert_close(jacobian, torch.eye(4, dtype=torch.float64, device=device))
    if backend == "reference":
        return  # the plain formula is not claimed for extreme norms
    big = torch.finfo(torch.float32).max
    s = torch.tensor([[big, big, -big], [3e30, 0, 0], [1e-30, 2e-30, 0], [1e-45, 0, 0]])
    s = s.to(device).requires_grad_()
    v = fastcaps.exp_squash(s, backend=backend)
    (gs,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(v).all() and torch.isfinite(gs).all()
    v, gs, s = v.cpu(), gs.cpu(), s.detach().cpu()
    torch.testing.assert_close(v[0].norm(), torch.tensor(1.0))
    torch.testing.assert_close(v[1], torch.tensor([1.0, 0.0, 0.0]))
    # |s| << 1: v = s (1 - |s| / 2 + ...) to float32 precision, Jacobian the identity
    torch.testing.assert_close(v[2], s[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(gs[2], torch.ones(3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,dtype", backend_params([("torch", torch.float64),
                                                         ("triton", torch.float64)]))  # fmt: skip
def test_gradcheck_and_gradgradcheck_float64(on_device, backend, dtype):
    device = on_device
    g = torch.Generator().manual_seed(8)
    opts = dict(dtype=dtype, requires_grad=True)
    u = torch.randn(2, 5, 3, generator=g, **opts)
    weight = torch.randn(5, 3, 4, 3, generator=g, **opts)
    prior = torch.randn(5, 3, generator=g, **opts)
    u_hat = torch.randn(2, 5, 3, 4, generator=g, **opts)
    s = torch.randn(3, 6, generator=g, **opts)
    u, weight, prior, u_hat, s = (t.to(device) for t in (u, weight, prior, u_hat, s))
    cases = [
        (lambda a, w, p: fastcaps.capsule_attention_routing(a, w, p, backend=backend),
         (u, weight, prior)),
        (lambda x, p: fastcaps.attention_routing(x, p, backend=backend), (u_hat, prior)),
        (lambda x: fastcaps.exp_squash(x, backend=backend), (s,)),
    ]  # fmt: skip
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend,dtype", [p for p in ALL if p.values[1] != torch.bfloat16])
def test_zero_vectors(on_device, backend, dtype):
    shape = SHAPES[0]
    u, weight, _ = make_layer_inputs(shape, dtype, on_device, bias=False)
    prior = make_prior(shape, dtype, on_device)
    with torch.no_grad():
        u[1] = 0  # a whole sample of zero capsules: s = 0
        u[2, :5] = 0
    check_layer(backend, u, weight, prior, dtype, "zero inputs")
    zero_u = torch.zeros_like(u).requires_grad_()
    v = fastcaps.capsule_attention_routing(zero_u, weight, prior, backend=backend)
    assert torch.equal(v, torch.zeros_like(v))
    grads_ = torch.autograd.grad(v.sum(), (zero_u, weight, prior))
    assert all(torch.isfinite(t).all() for t in grads_)


@pytest.mark.parametrize("backend,dtype", FLOAT64)
def test_non_contiguous_inputs_and_gradients(on_device, backend, dtype):
    device = on_device
    shape = SHAPES[0]
    g = torch.Generator().manual_seed(10)
    u = torch.randn(shape.Nin, shape.B, shape.Din, generator=g, dtype=dtype).transpose(0, 1)
    weight = torch.randn(shape.Din, shape.Nout, shape.Dout, shape.Nin, generator=g, dtype=dtype)
    weight = weight.permute(3, 1, 2, 0) / shape.Din**0.5
    prior = torch.randn(shape.Nout, shape.Nin, generator=g, dtype=dtype).T
    u, weight, prior = (t.to(device).requires_grad_() for t in (u, weight, prior))
    assert not (u.is_contiguous() or weight.is_contiguous() or prior.is_contiguous())
    check_layer(backend, u, weight, prior, dtype, "non-contiguous")
    v = fastcaps.capsule_attention_routing(u, weight, prior, backend=backend)
    grad_v = torch.randn(shape.Dout, shape.B, shape.Nout, generator=g, dtype=dtype)
    grad_v = grad_v.to(device).permute(1, 2, 0)  # a non-contiguous incoming gradient
    got = torch.autograd.grad(v, (u, weight, prior), grad_v)
    wide = [as_float64_leaf(t) for t in (u, weight, prior)]
    expected = torch.autograd.grad(reference.capsule_attention_routing(*wide), wide, grad_v)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, dtype, "grad")


@pytest.mark.parametrize(
    "backend",
    ["reference", "torch",
     pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton"))],
)  # fmt: skip
def test_empty_batch(on_device, backend):
    device = on_device
    shape = Shape(0, 6, 3, 4, 2)
    u, weight, _ = make_layer_inputs(shape, torch.float32, device, bias=False)
    prior = make_prior(shape, torch.float32, device)
    v = fastcaps.capsule_attention_routing(u, weight, prior, backend=backend)
    assert v.shape == (0, 3, 4)
    gu, gw, gp = torch.autograd.grad(v.sum(), (u, weight, prior))
    assert gu.shape == u.shape and not gw.any() and not gp.any()
    u_hat = torch.zeros(0, 6, 3, 4, device=device, requires_grad=True)
    v = fastcaps.attention_routing(u_hat, backend=backend)
    (g,) = torch.autograd.grad(v.sum(), (u_hat,))
    assert v.shape == (0, 3, 4) and g.shape == u_hat.shape


def test_capsule_attention_routing_saves_nothing_of_u_hat_size():
    shape = Shape(8, 40, 6, 8, 4)
    u, weight, _ = make_layer_inputs(shape, torch.float32, "cpu", bias=False)
    prior = make_prior(shape, torch.float32, "cpu")
    v, saved = saved_state(
        lambda: fastcaps.capsule_attention_routing(u, weight, prior, backend="torch"),
        (u, weight, prior),
    )
    state = sorted(tuple(t.shape) for t in saved)
    # totals and s [B, Nout, Dout], the softmax child-major [Nin, B, Nout]: nothing with Nin
    # and Dout
    assert state == sorted([(8, 6, 8), (40, 8, 6), (8, 6, 8)])
    v.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_bad_input_names_the_argument():
    u, weight, _ = make_layer_inputs(SHAPES[0], torch.float32, "cpu", bias=False)
    u_hat = reference.predictions(u.detach(), weight.detach())
    with pytest.raises(ValueError, match=r"prior must have shape \[Nin, Nout\] = \(37, 3\)"):
        fastcaps.capsule_attention_routing(u, weight, torch.zeros(3, 37))
    with pytest.raises(ValueError, match=r"prior has dtype torch.float64 but u_hat has"):
        fastcaps.attention_routing(u_hat, torch.zeros(37, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"u_hat must have shape \[B, Nin, Nout, Dout\]"):
        fastcaps.attention_routing(u_hat[0])
    with pytest.raises(ValueError, match=r"weight must have shape \[Nin, Nout, Dout, Din\]"):
        fastcaps.capsule_attention_routing(u, weight[:5])
    with pytest.raises(ValueError, match=r"s must be a floating-point tensor"):
        fastcaps.exp_squash(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\]"):
        fastcaps.exp_squash(torch.ones(3, 4), dim=2)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fastcaps.attention_routing(u_hat, backend="cuda")


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
def test_triton_layer_saves_no_u_hat(device):
    """The fused layer keeps u, weight, prior and [2, B, Nout, Dout] of state (T and s, 0 and
    T / sqrt(Dout)): nothing with both Nin and Dout."""
    skip_cpu_triton_beside_a_gpu(device)
    shape = Shape(8, 40, 6, 8, 4)
    u, weight, _ = make_layer_inputs(shape, torch.float32, device, bias=False)
    prior = make_prior(shape, torch.float32, device)
    v, saved = saved_state(
        lambda: fastcaps.capsule_attention_routing(u, weight, prior, backend="triton"),
        (u, weight, prior),
    )
    assert sorted(tuple(t.shape) for t in saved) == [(2, 8, 6, 8), (2, 8, 6, 8)]
    v.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (u, weight, prior))


def test_the_row_sum_identity_that_makes_it_linear():
    """sum_k u_i . u_k = u_i . sum_k u_k: the agreement without the Nin x Nin matrix."""
    x = torch.randn(3, 50, 4, 6, dtype=torch.float64)
    per_parent = x.permute(0, 2, 1, 3)
    quadratic = (per_parent @ per_parent.transpose(-1, -2)).sum(-1)
    linear = torch.einsum("bjid,bjd->bji", per_parent, per_parent.sum(2))
    torch.testing.assert_close(linear, quadratic)
