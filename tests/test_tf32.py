"""TF32 dots: the interpreter rounds float32 dot inputs as the tensor cores do, so the float32
opt-ins (torch.set_float32_matmul_precision "high": 3-pass TF32, "medium": 1 pass) are tested with
their real errors; on a GPU the same checks test the hardware against that rounding."""

from __future__ import annotations

import functools

import pytest
import torch
from test_attention import make_prior

import fastcaps
from conftest import (
    SHAPES,
    TF32_TOLERANCE,
    TRITON,
    as_float64_leaf,
    assert_close,
    make_layer_inputs,
    skip_cpu_triton_beside_a_gpu,
)
from fastcaps import reference

pytestmark = pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")


@functools.cache
def dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def square_dot_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr, PRECISION: tl.constexpr):
        i = tl.arange(0, N)
        offsets = i[:, None] * N + i[None, :]
        a = tl.load(a_ptr + offsets)
        b = tl.load(b_ptr + offsets)
        tl.store(out_ptr + offsets, tl.dot(a, b, input_precision=PRECISION))

    return square_dot_kernel


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """float32 with the 13 low mantissa bits cleared (what the tensor cores read as TF32)."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


@pytest.fixture
def dot_device(device):
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.backend import load_triton_ops

    load_triton_ops()  # under the interpreter: installs the TF32 rounding
    return device


def square_dot(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    out = torch.empty_like(a)
    dot_kernel()[(1,)](a, b, out, N=a.shape[0], PRECISION=precision)
    return out.cpu().double()


@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
def test_float32_dot_rounds_its_inputs_like_the_tensor_cores(dot_device, precision):
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(32, 32, generator=g) for _ in range(2))
    exact = a.double() @ b.double()
    peak = exact.abs().max().item()
    out = square_dot(a.to(dot_device), b.to(dot_device), precision)
    error = (out - exact).abs().max().item() / peak
    if precision == "tf32":
        # exactly the product of the truncated inputs, up to float32 sums; visibly off the exact
        truncated = tf32_truncated(a).double() @ tf32_truncated(b).double()
        assert (out - truncated).abs().max().item() <= 1e-6 * peak
        assert error > 1e-4
    else:
        # ieee: float32 products and sums; tf32x3: within a few float32 roundings of them
        assert error <= 1e-6
    if precision == "tf32x3":
        tf32_error = (square_dot(a.to(dot_device), b.to(dot_device), "tf32") - exact).abs().max()
        assert error < tf32_error.item() / peak / 100


def run_op(op: str, inputs: tuple, backend: str | None) -> torch.Tensor:
    """The op on ``backend`` (None: fastcaps.reference): inputs (u, weight) for predictions, plus
    the bias for capsule_routing (3 iterations) or the prior for capsule_attention_routing."""
    if op == "predictions":
        return (reference.predictions(*inputs) if backend is None
                else fastcaps.predictions(*inputs, backend=backend))  # fmt: skip
    if op == "capsule_routing":
        u, weight, bias = inputs
        return (reference.capsule_routing(u, weight, 3, bias) if backend is None
                else fastcaps.capsule_routing(u, weight, 3, bias, backend=backend))  # fmt: skip
    return (reference.capsule_attention_routing(*inputs) if backend is None
            else fastcaps.capsule_attention_routing(*inputs, backend=backend))  # fmt: skip


def output_and_grads(op: str, inputs: tuple, backend: str | None) -> list[torch.Tensor]:
    out = run_op(op, inputs, backend)
    g = torch.Generator().manual_seed(9)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=lambda s: s.id)
@pytest.mark.parametrize("precision", ["high", "medium"])
@pytest.mark.parametrize("op", ["predictions", "capsule_routing", "capsule_attention_routing"])
def test_tf32_opt_ins_meet_their_tolerances(dot_device, float32_matmul_precision, op, precision,
                                            shape):  # fmt: skip
    """torch.set_float32_matmul_precision: "high" (3-pass TF32 in the forward kernels) stays
    within the float32 tolerances, "medium" (1 pass, also in the pairs and two-pass backward
    kernels) within TF32_TOLERANCE; the output and the gradient of every input."""
    from fastcaps._interpreter import exact_float32_dots

    u, weight, bias = make_layer_inputs(shape, torch.float32, dot_device, bias=True)
    inputs = {"predictions": (u, weight), "capsule_routing": (u, weight, bias),
              "capsule_attention_routing": (u, weight, make_prior(shape, torch.float32,
                                                                  dot_device))}[op]  # fmt: skip
    float32_matmul_precision(precision)
    got = output_and_grads(op, inputs, "triton")
    expected = output_and_grads(op, tuple(as_float64_leaf(t) for t in inputs), None)
    tolerance = None if precision == "high" else TF32_TOLERANCE
    for name, g, e in zip(("output", "grad u", "grad weight", "grad bias/prior"), got, expected,
                          strict=False):  # fmt: skip
        assert g.dtype == torch.float32
        assert_close(g, e, torch.float32, f"{op} {precision} {name}", tolerance)
    if dot_device.type == "cpu":  # not vacuous: the rounded dots changed the result
        with exact_float32_dots():
            exact = output_and_grads(op, inputs, "triton")
        assert any(not torch.equal(a, b) for a, b in zip(got, exact, strict=True))
