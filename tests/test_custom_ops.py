"""fastcaps.custom_ops: eager calls of the Triton ops skip the dispatcher, with the op's own
autograd formula; traced calls, dispatch modes and the switch take the registered op; both give
the same numbers."""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcaps
from conftest import TRITON_DEVICE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the triton ops need triton"
)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def run_layer(direct: bool):
    from fastcaps import custom_ops

    g = torch.Generator().manual_seed(3)
    u = torch.randn(3, 7, 4, generator=g).to(TRITON_DEVICE).requires_grad_()
    weight = torch.randn(7, 5, 6, 4, generator=g).to(TRITON_DEVICE).requires_grad_()
    previous, custom_ops.DIRECT_CALLS = custom_ops.DIRECT_CALLS, direct
    try:
        v = fastcaps.capsule_routing(u, weight, 3, backend="triton")
        node = type(v.grad_fn).__name__
        v.backward(torch.arange(v.numel(), dtype=v.dtype, device=v.device).view_as(v))
    finally:
        custom_ops.DIRECT_CALLS = previous
    return v.detach(), u.grad, weight.grad, node


def test_eager_calls_skip_the_dispatcher_and_match_the_registered_op():
    v, grad_u, grad_weight, node = run_layer(direct=True)
    v_op, grad_u_op, grad_weight_op, node_op = run_layer(direct=False)
    assert "capsule_routing_op_function" in node and "capsule_routing_op_function" not in node_op
    for got, expected in ((v, v_op), (grad_u, grad_u_op), (grad_weight, grad_weight_op)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dispatch_modes_and_no_grad_calls():
    s = torch.randn(4, 9, 5, device=TRITON_DEVICE)
    expected = fastcaps.squash(s, backend="triton")
    with OpNames() as mode:
        under_mode = fastcaps.squash(s, backend="triton")
    assert "fastcaps.squash.default" in mode.names  # a mode sees the registered op
    with OpNames() as mode:
        with torch.no_grad():
            fastcaps.squash(s.requires_grad_(), backend="triton")
    assert "fastcaps.squash.default" in mode.names
    torch.testing.assert_close(under_mode, expected, rtol=0, atol=0)
    with torch.no_grad():
        plain = fastcaps.squash(s, backend="triton")
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
