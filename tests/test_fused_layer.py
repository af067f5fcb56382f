"""The fused capsule layer (capsule_routing on the triton backend): its memory contract, and the
unfused Triton layer it replaces. Its values and gradients are checked against the reference with
every other backend in tests/test_backends.py."""

import importlib.util

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastcaps
from conftest import Shape, make_layer_inputs
from fastcaps import reference, triton_launch
from fastcaps.triton_launch import override_routing_plan

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the triton backend needs triton"
)
DEVICE = "cuda" if CUDA else "cpu"
# Din < Nout and B > Dout * Din, so u-sized and weight-sized tensors are smaller than the logits;
# Dout = 8 > 2 (R - 1) keeps the stored coefficients of 3 iterations below u_hat's size
SHAPE = Shape(40, 24, 6, 8, 3)


def saved_tensors(backend: str, u, weight, bias) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = fastcaps.capsule_routing(u, weight, 3, bias, backend=backend)
    v.sum().backward()  # the graph works with only what was saved
    assert torch.isfinite(u.grad).all() and torch.isfinite(weight.grad).all()
    return saved


def test_fused_layer_saves_only_inputs_and_per_iteration_state():
    u, weight, bias = make_layer_inputs(SHAPE, torch.float32, DEVICE, bias=True)
    saved = saved_tensors("triton", u, weight, bias)
    inputs = {t.data_ptr() for t in (u, weight, bias)}  # bias: for a double backward
    state = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert state == [(3, SHAPE.B, SHAPE.Nout, SHAPE.Dout)] * 2  # s and V of every iteration
    assert {t.data_ptr() for t in saved} >= inputs


def largest_allocation(backend: str, u, weight, bias) -> int:
    """Elements of the largest tensor the CPU allocator handed out during forward and backward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v = fastcaps.capsule_routing(u, weight, 3, bias, backend=backend)
        torch.autograd.grad(v, (u, weight, bias), torch.ones_like(v))
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes) // u.element_size()


@pytest.mark.skipif(CUDA, reason="counts CPU allocations; on CUDA see the peak-memory test")
@pytest.mark.parametrize("stored", [False, True], ids=["recompute", "stored-coefficients"])
def test_fused_layer_never_allocates_u_hat(stored, monkeypatch):
    # the guarantee holds for layers whose u_hat exceeds SMALL_SPLIT_BYTES (smaller ones may
    # split into more partial sums to fill a GPU); this small layer is held to it as well
    monkeypatch.setattr(triton_launch, "SMALL_SPLIT_BYTES", 0)
    u, weight, bias = make_layer_inputs(SHAPE, torch.float32, "cpu", bias=True)
    logits_size = SHAPE.B * SHAPE.Nin * SHAPE.Nout
    u_hat_size = logits_size * SHAPE.Dout
    with override_routing_plan(store_coefficients=stored):
        fastcaps.capsule_routing(u, weight, 3, bias, backend="triton")  # load and warm up first
        largest = largest_allocation("triton", u, weight, bias)
    # the coefficient buffers (c_r and ga_r of iterations 1 .. R-1) are the largest allocation
    # when kept; otherwise the slices' partial sums, at most the logits' size
    assert largest <= (2 if stored else 1) * logits_size < u_hat_size
    # the check can fail: the torch backend does materialize u_hat
    assert largest_allocation("torch", u, weight, bias) >= u_hat_size


@pytest.mark.skipif(not CUDA, reason="peak CUDA memory needs a GPU")
def test_fused_layer_peak_memory_is_a_fifth_of_the_torch_backend():
    shape = Shape(128, 1152, 10, 16, 8)
    u, weight, _ = make_layer_inputs(shape, torch.float32, "cuda", bias=False)

    def peak(backend: str) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        v = fastcaps.capsule_routing(u, weight, 3, backend=backend)
        torch.autograd.grad(v, (u, weight), torch.ones_like(v))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak("triton")
    assert peak("triton") * 5 < peak("torch")


@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
def test_unfused_triton_layer_matches_reference(detach_logits):
    from fastcaps.triton_routing import capsule_routing_unfused

    shape = Shape(3, 9, 4, 5, 3)
    u, weight, bias = make_layer_inputs(shape, torch.float64, DEVICE, bias=True)
    v = capsule_routing_unfused(u, weight, 3, bias, detach_logits=detach_logits)
    v_ref = reference.capsule_routing(u, weight, 3, bias, detach_logits=detach_logits)
    torch.testing.assert_close(v, v_ref)
    for g, e in zip(
        torch.autograd.grad(v.sum(), (u, weight, bias)),
        torch.autograd.grad(v_ref.sum(), (u, weight, bias)),
        strict=True,
    ):
        torch.testing.assert_close(g, e)
