"""The training tool's mixed precision (fastcaps.amp): on a CPU without native half precision,
autocast's low-precision ops are emulated with float32 kernels on rounded operands. The emulation
must compute what a native half-precision kernel computes (value and gradients), touch nothing
else, and be switched on only where it is needed."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

from conftest import assert_close
from fastcaps import amp
from fastcaps.amp import EmulatedLowPrecision

NATIVE_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported")


def leaf(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


# (name, call, its tensor arguments)
CASES = {
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(2, 3, 9, 7), (5, 3, 3, 3), (5,)]),
    "conv1d": (lambda x, w: F.conv1d(x, w, stride=2), [(2, 4, 11), (3, 4, 3)]),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w), [(2, 3, 5, 5), (3, 4, 3, 3)]),
    "linear": (F.linear, [(6, 20), (7, 20), (7,)]),
    "bmm": (torch.bmm, [(3, 6, 9), (3, 9, 4)]),
    "matmul-operator": (lambda a, b: a @ b, [(3, 6, 9), (9, 4)]),
    "Tensor.matmul": (lambda a, b: a.matmul(b), [(6, 9), (9, 4)]),
    "addmm": (torch.addmm, [(4,), (6, 9), (9, 4)]),
    "baddbmm": (torch.baddbmm, [(3, 6, 4), (3, 6, 9), (3, 9, 4)]),
}


def value_and_grads(call, tensors):
    out = call(*tensors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return out, torch.autograd.grad(out, tensors, grad_out.to(out.dtype))


def half_precision_kernel(call, tensors):
    """What a native bfloat16 kernel computes: exact products of the rounded operands (float64
    here), accumulated, and one rounding of the result, in the forward and the backward (whose
    incoming gradient is bfloat16 too)."""
    rounded = [t.detach().bfloat16().double().requires_grad_() for t in tensors]
    out = call(*rounded)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    found = torch.autograd.grad(out, rounded, grad_out.bfloat16().double())
    return out.bfloat16(), [g.bfloat16().float() for g in found]


@pytest.mark.parametrize("case", CASES)
def test_emulation_computes_what_a_native_half_precision_kernel_computes(case):
    call, shapes = CASES[case]
    tensors = [leaf(*shape, seed=i) for i, shape in enumerate(shapes)]
    with torch.autocast("cpu", dtype=torch.bfloat16), EmulatedLowPrecision():
        emulated, emulated_grads = value_and_grads(call, tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # PyTorch's own kernels
        native = call(*tensors)
    ideal, ideal_grads = half_precision_kernel(call, tensors)
    assert emulated.dtype == native.dtype == torch.bfloat16
    # float32 accumulation against float64: at most a rounding boundary apart
    close = dict(atol=1e-5, rtol=2**-7)
    torch.testing.assert_close(emulated, ideal, **close, msg=lambda m: f"{case} value: {m}")
    assert_close(emulated, native, torch.bfloat16, f"{case} value against torch.autocast")
    for index, (got, want) in enumerate(zip(emulated_grads, ideal_grads, strict=True)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(
            got, want, **close, msg=lambda m, i=index: f"{case} grad of argument {i}: {m}"
        )


def test_emulation_rounds_the_operands_and_the_result():
    a, b = leaf(5, 33, seed=0), leaf(33, 6, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16), EmulatedLowPrecision():
        out = a @ b
    expected = (a.detach().bfloat16().float() @ b.detach().bfloat16().float()).bfloat16()
    assert torch.equal(out, expected)
    assert not torch.equal(out.float(), a.detach() @ b.detach())  # it is not float32


def test_emulation_leaves_everything_else_alone():
    a, b = leaf(5, 8, seed=0), leaf(8, 3, seed=1)
    plain = a.detach() @ b.detach()
    with EmulatedLowPrecision():
        assert torch.equal(a @ b, plain)  # autocast off: plain float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wide = a.double() @ b.double()  # float64 is not cast by autocast
            assert wide.dtype == torch.float64
            out = torch.empty(5, 3)
            torch.mm(a.detach(), b.detach(), out=out)  # an out= variant is not an autocast op
            assert torch.equal(out, plain)
            assert (a + 1).dtype == torch.float32  # not a low-precision op
            with torch.autocast("cpu", enabled=False):
                assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize(
    ("amp_name", "native", "emulates"),
    [("bf16", set(), True), ("bf16", {"_is_avx512_bf16_supported"}, False),
     ("bf16", {"_is_amx_tile_supported"}, False), ("fp16", {"_is_avx512_bf16_supported"}, True),
     ("fp16", {"_is_amx_fp16_supported"}, False), ("off", set(), False)],
    ids=["bf16-avx2", "bf16-avx512bf16", "bf16-amx", "fp16-avx512bf16", "fp16-amx", "off"],
)  # fmt: skip
def test_cpu_autocast_emulates_only_without_native_half_precision(
    monkeypatch, amp_name, native, emulates
):
    for check in NATIVE_CHECKS:
        monkeypatch.setattr(torch.cpu, check, lambda check=check: check in native, raising=False)
    with amp.autocast(torch.device("cpu"), amp_name):
        modes = _get_current_function_mode_stack()
        assert any(isinstance(m, EmulatedLowPrecision) for m in modes) == emulates
        assert torch.is_autocast_enabled("cpu") == (amp_name != "off")
    note = amp.cpu_amp_note(torch.device("cpu"), amp_name)
    assert (note is not None) == emulates
    if emulates:
        assert f"--amp {amp_name} on a CPU without native support" in note
    assert amp.cpu_amp_note(torch.device("meta"), amp_name) is None  # not a CPU
