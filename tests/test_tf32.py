"""TF32 dots: the interpreter rounds float32 dot inputs as the tensor cores do, so the float32
opt-ins (torch.set_float32_matmul_precision "high": 3-pass TF32, "medium": 1 pass) are tested with
their real errors; on a GPU the same checks test the hardware against that rounding."""

from __future__ import annotations

import functools

import pytest
import torch
from test_backends import check_capsule_routing

from conftest import CUDA, SHAPES, TRITON, make_layer_inputs

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
    if device.type == "cpu" and CUDA:
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1, off when a GPU is present")
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_three_pass_tf32_meets_the_float32_tolerances(dot_device, shape):
    """torch.set_float32_matmul_precision("high"): the u_hat dots of the forward kernels run as 3
    TF32 passes; output and every gradient still within the float32 tolerances."""
    from fastcaps.triton_launch import routing_plan

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        plan = routing_plan(shape.B, shape.Nin, shape.Nout, shape.Dout, shape.Din,
                            torch.float32, dot_device)  # fmt: skip
        assert plan.forward.precision == "tf32x3"
        u, weight, bias = make_layer_inputs(shape, torch.float32, dot_device, bias=True)
        check_capsule_routing("triton", u, weight, bias, 3, False, torch.float32, shape.id)
    finally:
        torch.set_float32_matmul_precision(before)
