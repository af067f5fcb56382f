"""Compile every Triton kernel with the real Triton compiler, down to an H100 (sm_90) cubin,
without a GPU.

The interpreter that runs the kernels in CI is more permissive than the compiler (types, loops,
ranks), so this catches code that would only fail on a GPU. Every launcher runs on CPU tensors
with ``JITFunction.run`` replaced by a function that compiles the kernel for the arguments it
was given instead of launching it. Covers float32, float16, bfloat16 and float64, an odd shape
and the MNIST layer's tile sizes, bias, detach_logits, and both u_hat sources.

Run with TRITON_INTERPRET unset: ``python tests/compile_for_gpu.py``; prints one line per
distinct compiled kernel variant and exits non-zero on the first compile error.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels instead of interpreting")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastcaps.triton_capsule_routing import capsule_routing_grads
from fastcaps.triton_predictions import (
    predictions_forward,
    predictions_grad_input,
    predictions_grad_weight,
)
from fastcaps.triton_routing import (
    PairSource,
    routing_backward_state,
    routing_forward,
    routing_grad_u_hat,
)
from fastcaps.triton_squash import squash_backward, squash_forward

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
}
compiled: set[str] = set()


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_instead_of_launch(self: JITFunction, *args, grid, warmup=False, **kwargs):
    bound = dict(zip(self.arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
    signature, constexprs = {}, {}
    for param in self.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = argument_type(value)
    triton.compile(ASTSource(self, signature, constexprs), target=TARGET, options=options)
    variant = ", ".join(f"{k}={v}" for k, v in constexprs.items())
    inputs = next(t for t in signature.values() if t.startswith("*"))
    line = f"{self.fn.__name__}({variant}) {inputs} {options}"
    if line not in compiled:
        compiled.add(line)
        print("compiled", line, flush=True)


def launch_everything(dtype: torch.dtype, batch: int, n_in: int, n_out: int, d_out: int, d_in: int):
    u = torch.randn(batch, n_in, d_in).to(dtype)
    weight = torch.randn(n_in, n_out, d_out, d_in).to(dtype)
    bias = torch.randn(n_out, d_out).to(dtype)
    u_hat = torch.randn(batch, n_in, n_out, d_out).to(dtype)
    squash_backward(u_hat, u_hat, 1e-8)
    squash_forward(u_hat, 1e-8)
    predictions_forward(u, weight)
    predictions_grad_input(u_hat, weight, dtype)
    predictions_grad_weight(u_hat, u, dtype)
    for source in (PairSource(u_hat=u_hat), PairSource(u=u, weight=weight)):
        for b in (None, bias):
            _, s_all, V_all = routing_forward(source, b, 3, 1e-8, dtype)
        grad_v = torch.randn(batch, n_out, d_out).to(dtype)
        for detach_logits in (False, True):
            grad_s_all = routing_backward_state(source, s_all, V_all, grad_v, detach_logits, 1e-8)
            if source.from_weight:
                capsule_routing_grads(u, weight, V_all, grad_s_all, detach_logits)
            else:
                routing_grad_u_hat(u_hat, V_all, grad_s_all, detach_logits)


def main() -> None:
    JITFunction.run = compile_instead_of_launch
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        launch_everything(dtype, 2, 37, 3, 5, 3)  # odd sizes
        launch_everything(dtype, 2, 32, 10, 16, 8)  # the MNIST layer's tiles
    print(f"{len(compiled)} kernel variants compiled for {TARGET}")


if __name__ == "__main__":
    main()
