"""squash on Triton: host launchers and the autograd Function (kernels in fastcaps.kernels)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fastcaps.backend import register_triton_op
from fastcaps.kernels.squash import squash_backward_kernel, squash_forward_kernel
from fastcaps.triton_launch import compute_dtype, row_launch


def _rows(t: Tensor) -> Tensor:
    """[..., D] -> [rows, D], a view whenever the layout allows one."""
    return t.reshape(-1, t.shape[-1])


def squash_forward(s: Tensor, eps: float) -> Tensor:
    """squash over the last dim of any shape; output contiguous, in s's dtype."""
    s2 = _rows(s)
    v = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = row_launch(*s2.shape)
        squash_forward_kernel[launch.grid](
            s2, v, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1), eps,
            COMPUTE_DTYPE=compute_dtype(s.dtype), BLOCK_ROWS=launch.block_rows,
            BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        )  # fmt: skip
    return v.view(s.shape)


def squash_backward(s: Tensor, grad_v: Tensor, eps: float) -> Tensor:
    """grad s of squash over the last dim, given s and grad v of the same shape."""
    s2, g2 = _rows(s), _rows(grad_v)
    grad_s = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = row_launch(*s2.shape)
        squash_backward_kernel[launch.grid](
            s2, g2, grad_s, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1),
            g2.stride(0), g2.stride(1), eps, COMPUTE_DTYPE=compute_dtype(s.dtype),
            BLOCK_ROWS=launch.block_rows, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        )  # fmt: skip
    return grad_s.view(s.shape)


class TritonSquashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, s: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(s)
        ctx.eps = eps
        return squash_forward(s, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_v: Tensor) -> tuple[Tensor, None]:
        (s,) = ctx.saved_tensors
        return squash_backward(s, grad_v, ctx.eps), None


@register_triton_op("squash")
def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Squash along ``dim`` of any shape."""
    return TritonSquashFunction.apply(s.movedim(dim, -1), eps).movedim(-1, dim)
