"""Under ``torch.autocast`` fastcaps' ops are not autocast ops: they compute exactly as they do
without it (float32 math for half inputs, as the Triton kernels do), on one chunk of the batch or
many. Autocast would otherwise round every batched matmul inside the torch backend to half
precision, and the whole backward, which runs in the dtype of the saved state."""

import contextlib

import pytest
import torch

import fastcaps
from conftest import CUDA, Shape, backend_params, grads, make_layer_inputs

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
LAYER = Shape(9, 13, 4, 5, 3)  # B = 9: chunks of 4, 4 and 1 under a tiny budget


def layer_inputs(op: str, dtype, device) -> tuple[torch.Tensor, ...]:
    u, weight, bias = make_layer_inputs(LAYER, dtype, device, bias=True)
    if op in ("squash", "exp_squash"):
        return (u,)
    if op in ("dynamic_routing", "attention_routing"):
        u_hat = torch.einsum("ijdk,bik->bijd", weight.detach().double(), u.detach().double())
        u = u_hat.to(dtype).requires_grad_()
    if op == "predictions":
        return u, weight
    if op in ("capsule_routing", "dynamic_routing"):
        return (u, weight, bias) if op == "capsule_routing" else (u, bias)
    prior = (0.1 * torch.randn(LAYER.Nin, LAYER.Nout)).to(device, dtype).requires_grad_()
    return (u, weight, prior) if op == "capsule_attention_routing" else (u, prior)


OPS = {
    "predictions": lambda u, w, backend: fastcaps.predictions(u, w, backend=backend),
    "capsule_routing": lambda u, w, b, backend: fastcaps.capsule_routing(
        u, w, 3, b, backend=backend),
    "dynamic_routing": lambda u_hat, b, backend: fastcaps.dynamic_routing(
        u_hat, 3, b, backend=backend),
    "capsule_attention_routing": lambda u, w, prior, backend: fastcaps.capsule_attention_routing(
        u, w, prior, backend=backend),
    "attention_routing": lambda u_hat, prior, backend: fastcaps.attention_routing(
        u_hat, prior, backend=backend),
    "squash": lambda s, backend: fastcaps.squash(s, backend=backend),
    "exp_squash": lambda s, backend: fastcaps.exp_squash(s, backend=backend),
}  # fmt: skip
CHUNKED_OPS = ("capsule_routing", "dynamic_routing")  # the torch backend chunks these off CUDA
# the interpreter has no half-precision arithmetic: triton in half precision on CUDA only
PAIRS = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32)] + (
    [("triton", torch.bfloat16), ("triton", torch.float16)] if CUDA else []
)


def output_and_grads(op, backend, inputs, autocast=None, backward_under_autocast=False):
    """The op's output and its inputs' gradients; the forward under autocast to the dtype
    ``autocast`` (None: no autocast), and the backward too if ``backward_under_autocast``."""
    on = lambda: torch.autocast(inputs[0].device.type, autocast)  # noqa: E731
    with on() if autocast else contextlib.nullcontext():
        out = OPS[op](*inputs, backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    with on() if backward_under_autocast else contextlib.nullcontext():
        return out, grads(out, inputs, grad_out.to(out.device))


@pytest.mark.parametrize("backward", ["backward-outside", "backward-inside"])
@pytest.mark.parametrize(
    "op,chunked",
    [pytest.param(op, False, id=op) for op in OPS]
    + [pytest.param(op, True, id=f"{op}-chunks") for op in CHUNKED_OPS],
)
@pytest.mark.parametrize("backend,dtype", backend_params(PAIRS))
def test_ops_compute_the_same_under_autocast(
    on_device, backend, dtype, op, chunked, backward, chunk_budget
):
    inside = backward == "backward-inside"
    if op == "predictions" and backend == "torch" and inside:
        pytest.skip(
            "a plain matmul's backward under autocast is autocast (PyTorch advises against "
            "a backward under autocast); the custom Functions are immune"
        )
    if chunked:
        if backend != "torch" or on_device.type != "cpu":
            pytest.skip("only the torch backend's dynamic routing off CUDA splits the batch")
        chunk_budget(1)
    inputs = layer_inputs(op, dtype, on_device)
    plain_out, plain_grads = output_and_grads(op, backend, inputs)
    out, found = output_and_grads(op, backend, inputs, AUTOCAST_DTYPE[on_device.type], inside)
    assert out.dtype == plain_out.dtype == dtype
    torch.testing.assert_close(out, plain_out, atol=0, rtol=0, msg=lambda m: f"output: {m}")
    for index, (got, want) in enumerate(zip(found, plain_grads, strict=True)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(
            got, want, atol=0, rtol=0, msg=lambda m, i=index: f"grad of input {i}: {m}"
        )
