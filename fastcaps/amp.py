"""Mixed precision for the training tool: ``torch.autocast``, made usable on CPUs without native
half precision.

On such a CPU (AVX2 and no AMX, say) PyTorch's bfloat16 and float16 convolutions and matmuls are
generic fallbacks: CapsNet's training step ran at 4.4 images/s in bfloat16 against 51.0 in
float32 on a 2-core AVX2 machine. There ``autocast`` adds ``EmulatedLowPrecision``, which runs
autocast's low-precision ops as float32 kernels on operands rounded to the autocast dtype and
rounds their result to it. A native kernel computes the same thing (products of half-precision
operands accumulated in float32, one rounding of the result), so training keeps the numerics of
half precision, at about float32 speed instead of a tenth of it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.cpu checks for native half-precision arithmetic, per --amp choice
NATIVE_CPU_CHECKS = {
    "bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
    "fp16": ("_is_amx_fp16_supported",),
}
NATIVE_CPU_NEEDS = {"bf16": "AVX-512 BF16 or AMX", "fp16": "AMX-FP16"}

# The ops CPU autocast runs in low precision, as a model reaches them (nn.Conv*d, nn.Linear and
# the matmul functions and methods); fastcaps' own ops are not autocast ops.
LOW_PRECISION_OPS = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.linear, torch.mm, torch.bmm, torch.matmul, torch.addmm, torch.baddbmm, torch.addbmm,
    Tensor.mm, Tensor.bmm, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__,
})  # fmt: skip


def native_cpu_support(amp: str) -> bool:
    """Whether this CPU computes ``--amp amp`` natively (True for "off")."""
    if AMP_DTYPES[amp] is None:
        return True
    return any(getattr(torch.cpu, check, lambda: False)() for check in NATIVE_CPU_CHECKS[amp])


class EmulatedLowPrecision(TorchFunctionMode):
    """While CPU autocast is on, its low-precision ops (``LOW_PRECISION_OPS``) run as float32 ops
    on float32 operands rounded to the autocast dtype, and return the float32 result rounded to
    it: what a native kernel computes, at float32 speed. Everything else, and everything while
    CPU autocast is off (inside fastcaps' ops, say), runs as it would. Gradients flow through the
    roundings, so the backward's products are of rounded operands too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in LOW_PRECISION_OPS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        dtype = torch.get_autocast_dtype("cpu")
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        # autocast's own rule: only CPU floating-point tensors other than float64 are cast, and
        # an out= variant is not an autocast op
        if "out" in kwargs or any(t.dtype == torch.float64 or t.device.type != "cpu"
                                  for t in tensors if t.is_floating_point()):  # fmt: skip
            return func(*args, **kwargs)

        def rounded(t):
            if isinstance(t, Tensor) and t.is_floating_point():
                return t.to(dtype).float()
            return t

        args = tuple(rounded(a) for a in args)
        kwargs = {name: rounded(value) for name, value in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs).to(dtype)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``--amp amp``'s dtype (nothing for "off"), with
    ``EmulatedLowPrecision`` on a CPU without native support for it."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu" and not native_cpu_support(amp):
        stack.enter_context(EmulatedLowPrecision())
    return stack


def cpu_amp_note(device: torch.device, amp: str) -> str | None:
    """What ``--amp amp`` does on this CPU when it has no native support for it, or None."""
    if device.type != "cpu" or native_cpu_support(amp):
        return None
    return (
        f"--amp {amp} on a CPU without native support ({NATIVE_CPU_NEEDS[amp]}): convolutions "
        "and matmuls run as float32 kernels on operands rounded to half precision (the "
        "numerics of native half precision, at about float32 speed; PyTorch's own half-"
        "precision kernels here are generic and many times slower). --amp off is faster"
    )
