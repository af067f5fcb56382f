"""exp_squash (Efficient-CapsNet) on Triton: host launchers, registered as the
``torch.library`` ops ``fastcaps::exp_squash`` and ``fastcaps::exp_squash_backward`` with
autograd and fake (shape-only) implementations (kernels in fastcaps.kernels.squash)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.kernels.squash import exp_squash_backward_kernel, exp_squash_forward_kernel
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_launch import COMPILER_OPTIONS, compute_dtype, vector_launch


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def exp_squash_forward(s: Tensor) -> Tensor:
    """exp_squash over the last dim of any shape; output contiguous, in s's dtype."""
    s2 = _rows(s)
    v = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = vector_launch(*s2.shape, s.dtype)
        exp_squash_forward_kernel[launch.grid](
            s2, v, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1),
            COMPUTE_DTYPE=compute_dtype(s.dtype), BLOCK_ROWS=launch.block_rows,
            BLOCK_D=launch.block_d, num_warps=launch.num_warps, **COMPILER_OPTIONS,
        )  # fmt: skip
    return v.view(s.shape)


def exp_squash_backward(s: Tensor, grad_v: Tensor) -> Tensor:
    """grad s of exp_squash over the last dim, given s and grad v of the same shape."""
    s2, g2 = _rows(s), _rows(grad_v)
    grad_s = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = vector_launch(*s2.shape, s.dtype)
        exp_squash_backward_kernel[launch.grid](
            s2, g2, grad_s, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1),
            g2.stride(0), g2.stride(1), COMPUTE_DTYPE=compute_dtype(s.dtype),
            BLOCK_ROWS=launch.block_rows, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    return grad_s.view(s.shape)


@torch.library.custom_op("fastcaps::exp_squash", mutates_args=())
def exp_squash_op(s: Tensor) -> Tensor:
    """exp_squash over the last dim (the Triton forward kernel)."""
    return exp_squash_forward(s)


@exp_squash_op.register_fake
def _(s: Tensor) -> Tensor:
    return s.new_empty(s.shape)


@torch.library.custom_op("fastcaps::exp_squash_backward", mutates_args=())
def exp_squash_backward_op(s: Tensor, grad_v: Tensor) -> Tensor:
    """grad s of ``fastcaps::exp_squash`` (the Triton backward kernel)."""
    return exp_squash_backward(s, grad_v)


@exp_squash_backward_op.register_fake
def _(s: Tensor, grad_v: Tensor) -> Tensor:
    return s.new_empty(s.shape)


def _setup(ctx, inputs: tuple, output: Tensor) -> None:
    (s,) = inputs
    ctx.save_for_backward(s)


def _grad(ctx, grad_v: Tensor) -> Tensor:
    (s,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return graph_grads(reference.exp_squash, (s,), grad_v, (True,))[0]
    return exp_squash_backward_op(s, grad_v)


torch.library.register_autograd("fastcaps::exp_squash", _grad, setup_context=_setup)


@register_triton_op("exp_squash")
def exp_squash(s: Tensor, dim: int = -1) -> Tensor:
    """exp_squash along ``dim`` of any shape."""
    return exp_squash_op(s.movedim(dim, -1)).movedim(-1, dim)
