"""squash on Triton: host launchers, registered as the ``torch.library`` ops ``fastcaps::squash``
and ``fastcaps::squash_backward`` with autograd and fake (shape-only) implementations, so
``torch.compile(fullgraph=True)`` sees one opaque op (kernels in fastcaps.kernels.squash)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.kernels.squash import squash_backward_kernel, squash_forward_kernel
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_launch import COMPILER_OPTIONS, compute_dtype, vector_launch


def _rows(t: Tensor) -> Tensor:
    """[..., D] -> [rows, D], a view whenever the layout allows one."""
    return t.reshape(-1, t.shape[-1])


def _dense(d: int, block_d: int, *views: Tensor) -> bool:
    """Whether every [rows, D] view is contiguous with D a power of two (the kernels' DENSE)."""
    return d == block_d and all(v.stride(1) == 1 and v.stride(0) == d for v in views)


def squash_forward(s: Tensor, eps: float, exp: bool = False) -> Tensor:
    """squash (or with ``exp`` exp_squash, eps unused) over the last dim of any shape; output
    contiguous, in s's dtype."""
    s2 = _rows(s)
    v = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = vector_launch(*s2.shape)
        squash_forward_kernel[launch.grid](
            s2, v, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1), eps, EXP=exp,
            DENSE=_dense(s2.shape[1], launch.block_d, s2), COMPUTE_DTYPE=compute_dtype(s.dtype),
            BLOCK_ROWS=launch.block_rows, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    return v.view(s.shape)


def squash_backward(s: Tensor, grad_v: Tensor, eps: float, exp: bool = False) -> Tensor:
    """grad s of squash (or with ``exp`` of exp_squash) over the last dim, given s and grad v of
    the same shape."""
    s2, g2 = _rows(s), _rows(grad_v)
    grad_s = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
    if s2.numel():
        launch = vector_launch(*s2.shape)
        dense = _dense(s2.shape[1], launch.block_d, s2, g2)
        squash_backward_kernel[launch.grid](
            s2, g2, grad_s, s2.shape[0], s2.shape[1], s2.stride(0), s2.stride(1),
            g2.stride(0), g2.stride(1), eps, EXP=exp, DENSE=dense,
            COMPUTE_DTYPE=compute_dtype(s.dtype), BLOCK_ROWS=launch.block_rows,
            BLOCK_D=launch.block_d, num_warps=launch.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    return grad_s.view(s.shape)


@custom_op("fastcaps::squash")
def squash_op(s: Tensor, eps: float) -> Tensor:
    """squash over the last dim (the Triton forward kernel)."""
    return squash_forward(s, eps)


@squash_op.register_fake
def _(s: Tensor, eps: float) -> Tensor:
    return s.new_empty(s.shape)


@custom_op("fastcaps::squash_backward")
def squash_backward_op(s: Tensor, grad_v: Tensor, eps: float) -> Tensor:
    """grad s of ``fastcaps::squash`` (the Triton backward kernel)."""
    return squash_backward(s, grad_v, eps)


@squash_backward_op.register_fake
def _(s: Tensor, grad_v: Tensor, eps: float) -> Tensor:
    return s.new_empty(s.shape)


def _setup_squash(ctx, inputs: tuple, output: Tensor) -> None:
    s, ctx.eps = inputs
    ctx.save_for_backward(s)


def _squash_grad(ctx, grad_v: Tensor) -> tuple[Tensor, None]:
    (s,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        squash_last = lambda x: reference.squash(x, eps=ctx.eps)  # noqa: E731
        return graph_grads(squash_last, (s,), grad_v, (True,))[0], None
    return squash_backward_op(s, grad_v, ctx.eps), None


squash_op.register_autograd(_squash_grad, setup_context=_setup_squash)


@register_triton_op("squash")
def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Squash along ``dim`` of any shape."""
    return squash_op(s.movedim(dim, -1), eps).movedim(-1, dim)
