"""Numerics at the edges: squash and routing exact at every norm, incoming gradients of any
strides, higher-order gradients, half precision on the reference.

The squash oracle is mpmath at 80 significant digits with the plain formulas
(``v = s n / ((1 + n) sqrt(n + eps))``, ``gs = f gv + 2 f'(n) (s . gv) s``), so it is independent
of the backends' tangential/radial rewrite and immune to their overflow and cancellation.
"""

import functools
import importlib.util

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcaps
from conftest import as_float64_leaf, grads
from fastcaps import reference

TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
EPS = 1e-8
# exact to the dtype's precision: per vector |x - x_exact| <= rtol |x_exact| + atol, where atol
# only admits results whose exact value lies below the dtype's normal range
NORM_TOLERANCE = {torch.float32: (2e-6, 1e-37), torch.float64: (1e-13, 1e-300)}
# the largest |s| covered, per dtype: 1e18 in float32 as promised (every finite s is finite);
# float64's counterpart
MAX_EXPONENT = {torch.float32: 18, torch.float64: 150}


def backends():
    skip = pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
    return [
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton", marks=[skip]),
    ]


def on_device(backend: str) -> str:
    """CUDA when present; the triton backend runs on CPU only under the interpreter."""
    if CUDA:
        return "cuda"
    return "cpu"


@functools.cache
def _mp():
    ctx = mpmath.mp.clone()
    ctx.dps = 80
    return ctx


def exact_squash(s: torch.Tensor, grad_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """squash and its vector-Jacobian product along the last dim, in 80-digit arithmetic, and per
    vector the size of what the product is made of, |J| |gv| (|J| = max(f, |g'|), the Jacobian's
    spectral norm)."""
    mp = _mp()
    rows_s = s.detach().double().reshape(-1, s.shape[-1]).tolist()
    rows_g = grad_v.detach().double().reshape(-1, s.shape[-1]).tolist()
    values, gradients, scales = [], [], []
    for row, grow in zip(rows_s, rows_g, strict=True):
        x = [mp.mpf(a) for a in row]
        gv = [mp.mpf(a) for a in grow]
        n = mp.fsum(a * a for a in x)
        root = mp.sqrt(n + EPS)
        f = n / ((1 + n) * root)
        df = (2 * EPS + n - n * n) / (2 * (1 + n) ** 2 * (n + EPS) * root)
        dot = mp.fsum(a * b for a, b in zip(x, gv, strict=True))
        values.append([float(f * a) for a in x])
        gradients.append([float(f * g + 2 * df * dot * a) for a, g in zip(x, gv, strict=True)])
        jacobian = max(abs(f), abs(f + 2 * n * df))
        scales.append(float(jacobian * mp.sqrt(mp.fsum(g * g for g in gv))))
    shape = s.shape
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64).reshape(shape)  # noqa: E731
    return as_tensor(values), as_tensor(gradients), torch.tensor(scales, dtype=torch.float64)


def assert_exact(actual, exact, dtype, what: str, scale=None) -> None:
    """Per vector ``|actual - exact| <= rtol * size + atol``, with size |exact| (a value) or
    ``scale`` (a gradient: |J| |gv|, since its tangential and radial parts are computed to the
    dtype's precision relative to their own sizes, not to their difference)."""
    rtol, atol = NORM_TOLERANCE[dtype]
    actual = actual.detach().double().cpu().reshape(-1, actual.shape[-1])
    exact = exact.reshape(-1, exact.shape[-1])
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual - exact).norm(dim=-1)
    size = exact.norm(dim=-1) if scale is None else torch.maximum(exact.norm(dim=-1), scale)
    bound = rtol * size + atol
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (
        f"{what}: row {worst} off by {err[worst]:.3e} (allowed {bound[worst]:.3e}, "
        f"|exact| {exact[worst].norm():.3e})"
    )


def squash_case(backend, dtype, s64, gv64):
    device = on_device(backend)
    s = s64.to(device=device, dtype=dtype).requires_grad_()
    v = fastcaps.squash(s, backend=backend)
    (gs,) = torch.autograd.grad(v, s, gv64.to(device=device, dtype=dtype))
    exact_v, exact_gs, scale = exact_squash(s, gv64.to(dtype))
    assert_exact(v, exact_v, dtype, f"{backend} {dtype} v")
    assert_exact(gs, exact_gs, dtype, f"{backend} {dtype} grad s", scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("exponent", [-30, -8, -4, 0, 3, 5, 6, 10, 13, 18], ids=lambda e: f"1e{e}")
def test_squash_is_exact_at_every_norm(backend, dtype, exponent):
    """The norms where the plain formulas broke: 3e5 (gradient), 1e10 (NaN), 7e12 (zero value)."""
    g = torch.Generator().manual_seed(exponent + 100)
    s64 = torch.randn(6, 8, generator=g, dtype=torch.float64) * 10.0**exponent
    s64[0, 1:] = 0  # an axis-aligned vector
    gv64 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gv64[1] = s64[1] / s64[1].norm()  # a purely radial incoming gradient
    squash_case(backend, dtype, s64, gv64)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", backends())
def test_squash_property_across_scales(backend, dtype, data):
    exponent = data.draw(st.floats(min_value=-30, max_value=MAX_EXPONENT[dtype]), label="log10|s|")
    dim = data.draw(st.integers(min_value=1, max_value=16), label="dim")
    seed = data.draw(st.integers(min_value=0, max_value=2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    s64 = torch.randn(3, dim, generator=g, dtype=torch.float64) * 10.0**exponent
    gv64 = torch.randn(3, dim, generator=g, dtype=torch.float64)
    squash_case(backend, dtype, s64, gv64)


@pytest.mark.parametrize("backend", backends())
def test_squash_is_finite_for_every_finite_input(backend):
    device = on_device(backend)
    big = torch.finfo(torch.float32).max
    s = torch.tensor([[big, big, -big], [big, 0.0, 0.0], [1e-45, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = s.to(device).requires_grad_()
    v = fastcaps.squash(s, backend=backend)
    (gs,) = torch.autograd.grad(v.sum(), s)
    v, gs = v.detach().cpu(), gs.cpu()
    assert torch.isfinite(v).all() and torch.isfinite(gs).all()
    torch.testing.assert_close(v[1], torch.tensor([1.0, 0.0, 0.0]))  # the unit vector
    assert float(v[0].norm()) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(v[3], torch.zeros(3)) and torch.equal(gs[3], torch.zeros(3))


ROUTING_RTOL = 1e-4  # relative to each tensor's norm; float32 rounding of the logits alone
# can move the coefficients by about 1e-7 x the logits' spread
ROUTING_ATOL = 1e-35  # results whose exact norm lies below float32's normal range


def routing_case(backend: str, op: str, exponent: float, seed: int, iterations: int) -> None:
    """float32 ``op`` on ``backend`` against the float64 reference on the same (rounded) inputs,
    inputs scaled by 10**exponent (bias too): the value and the gradient of every input."""
    device = on_device(backend)
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**exponent
    u64 = torch.randn(2, 9, 4, generator=g, dtype=torch.float64) * scale
    w64 = torch.randn(9, 3, 5, 4, generator=g, dtype=torch.float64) / 2
    b64 = torch.randn(3, 5, generator=g, dtype=torch.float64) * scale
    gv = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    if op == "dynamic_routing":
        inputs64 = (reference.predictions(u64, w64), b64)
        run = lambda x, b, **kw: fastcaps.dynamic_routing(x, iterations, b, **kw)  # noqa: E731
        run_ref = lambda x, b: reference.dynamic_routing(x, iterations, b)  # noqa: E731
    else:
        inputs64 = (u64, w64, b64)
        run = lambda a, c, b, **kw: fastcaps.capsule_routing(a, c, iterations, b, **kw)  # noqa: E731
        run_ref = lambda a, c, b: reference.capsule_routing(a, c, iterations, b)  # noqa: E731
    inputs = [t.float().to(device).requires_grad_() for t in inputs64]
    v = run(*inputs, backend=backend)
    got = (v, *torch.autograd.grad(v, inputs, gv.float().to(device)))
    inputs_ref = [as_float64_leaf(t.cpu()) for t in inputs]
    v_ref = run_ref(*inputs_ref)
    expected = (v_ref, *torch.autograd.grad(v_ref, inputs_ref, gv))
    names = ("v", *(f"grad input {i}" for i in range(len(inputs))))
    for name, a, e in zip(names, got, expected, strict=True):
        a, e = a.detach().double().cpu(), e.detach()
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err, size = float((a - e).norm()), float(e.norm())
        assert err <= ROUTING_RTOL * size + ROUTING_ATOL, (
            f"{name}: off by {err:.3e} at norm {size:.3e} (scale 1e{exponent:g})"
        )


ROUTING_OPS = ["dynamic_routing", "capsule_routing"]


@pytest.mark.parametrize("exponent", [-30, -10, -3, 3, 5, 8, 18], ids=lambda e: f"x1e{e}")
@pytest.mark.parametrize("op", ROUTING_OPS)
@pytest.mark.parametrize("backend", backends())
def test_routing_is_exact_at_large_and_small_scales(backend, op, exponent):
    """Routing inlines squash: at inputs x1e5 its gradients used to be off by 40-50%."""
    routing_case(backend, op, exponent, seed=1, iterations=3)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
@pytest.mark.parametrize("op", ROUTING_OPS)
@pytest.mark.parametrize("backend", backends())
def test_routing_property_across_scales(backend, op, data):
    exponent = data.draw(st.floats(min_value=-30, max_value=18), label="log10 scale")
    iterations = data.draw(st.integers(min_value=1, max_value=4), label="iterations")
    seed = data.draw(st.integers(min_value=0, max_value=2**31 - 1), label="seed")
    routing_case(backend, op, exponent, seed, iterations)


# ----------------------------------------------------------------------------------------------
# incoming gradients of any strides
# ----------------------------------------------------------------------------------------------

STRIDED = {
    "transposed": lambda g: g.transpose(0, 1).contiguous().transpose(0, 1),
    "permuted": lambda g: g.movedim(-1, 0).contiguous().movedim(0, -1),
    "expanded": lambda g: g[:1].expand_as(g),
    "sliced": lambda g: torch.cat([g, g], dim=-1)[..., ::2],
}


def all_backends():
    skip = pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
    return [
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton", marks=[skip]),
        pytest.param("reference", id="reference"),
    ]


def op_calls(device):
    g = torch.Generator().manual_seed(4)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    u, w, b = make(3, 7, 4), make(7, 3, 5, 4) / 2, make(3, 5)
    u_hat = reference.predictions(u, w)
    return {
        "squash": (lambda s: fastcaps.squash(s, backend=BACKEND[0]), (make(3, 4, 6),)),
        "predictions": (lambda a, c: fastcaps.predictions(a, c, backend=BACKEND[0]), (u, w)),
        "dynamic_routing": (
            lambda x, c: fastcaps.dynamic_routing(x, 3, c, backend=BACKEND[0]),
            (u_hat, b),
        ),
        "capsule_routing": (
            lambda a, c, d: fastcaps.capsule_routing(a, c, 3, d, backend=BACKEND[0]),
            (u, w, b),
        ),
    }


BACKEND = ["torch"]  # the backend op_calls' lambdas use, set by each test


@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize("op", ["squash", "predictions", "dynamic_routing", "capsule_routing"])
@pytest.mark.parametrize("backend", all_backends())
def test_backward_accepts_incoming_gradients_of_any_strides(backend, op, layout):
    device = on_device(backend) if backend == "triton" else "cpu"
    BACKEND[0] = backend
    fn, inputs = op_calls(device)[op]
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    plain = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    strided = STRIDED[layout](plain.to(out.device))
    assert not strided.is_contiguous() and torch.equal(strided.cpu(), STRIDED[layout](plain))
    got = torch.autograd.grad(out, inputs, strided)
    expected = torch.autograd.grad(fn(*inputs), inputs, strided.contiguous())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------------------------
# higher-order gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["squash", "predictions", "dynamic_routing", "capsule_routing"])
@pytest.mark.parametrize("backend", backends())
def test_gradgradcheck_float64(backend, op):
    device = on_device(backend)
    BACKEND[0] = backend
    fn, inputs = op_calls(device)[op]
    # a batch of 2 keeps the check quick; weights and biases whole
    inputs = [(t[:2] if i == 0 else t).clone().requires_grad_() for i, t in enumerate(inputs)]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
@pytest.mark.parametrize("backend", backends())
def test_gradient_penalty_matches_the_reference(backend, detach_logits):
    """A gradient penalty (WGAN-GP style): the second-order terms are there, not silently 0."""
    device = on_device(backend)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, 7, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.randn(7, 3, 5, 4, generator=g, dtype=torch.float64) / 2).to(device)
    w.requires_grad_()
    bias = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def penalty(run):
        v = run(u, w, 3, bias, detach_logits=detach_logits)
        (grad_u,) = torch.autograd.grad(v.norm(dim=-1).sum(), u, create_graph=True)
        return torch.autograd.grad(grad_u.pow(2).sum(), (w, bias))

    got = penalty(functools.partial(fastcaps.capsule_routing, backend=backend))
    expected = penalty(reference.capsule_routing)
    assert expected[0].abs().max() > 1e-3  # the check can fail: the true terms are not 0
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", backends())
def test_an_incoming_gradient_with_a_graph_is_differentiated(backend):
    """backward of a backward: the incoming gradient itself requires grad."""
    device = on_device(backend)
    s = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    grad_v = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    v = fastcaps.squash(s, backend=backend)
    (gs,) = torch.autograd.grad(v, s, grad_v, create_graph=True)
    got = torch.autograd.grad(gs.sum(), (s, grad_v))
    s_ref, gv_ref = as_float64_leaf(s), as_float64_leaf(grad_v)
    (gs_ref,) = torch.autograd.grad(reference.squash(s_ref), s_ref, gv_ref, create_graph=True)
    expected = torch.autograd.grad(gs_ref.sum(), (s_ref, gv_ref))
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# half precision on the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_reference_squash_in_half_precision_is_finite_and_right(dtype):
    s = torch.tensor([[0.0, 0.0, 0.0], [300.0, 400.0, 0.0], [0.1, 0.2, 0.2]], dtype=dtype)
    s.requires_grad_()
    v = reference.squash(s)
    (gs,) = grads(v, (s,), torch.ones(3, 3, dtype=torch.float64))
    assert v.dtype == dtype and torch.isfinite(v).all() and torch.isfinite(gs).all()
    assert torch.equal(v[0], torch.zeros(3, dtype=dtype))
    expected = reference.squash(s.detach().double())
    torch.testing.assert_close(v.double(), expected, atol=2e-3, rtol=2e-2)
