"""exp_squash (Efficient-CapsNet) on Triton, registered as the ``torch.library`` ops
``fastcaps::exp_squash`` and ``fastcaps::exp_squash_backward`` with autograd and fake
(shape-only) implementations. The squash kernels and launchers serve it (their EXP flag)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_squash import squash_backward, squash_forward


@custom_op("fastcaps::exp_squash")
def exp_squash_op(s: Tensor) -> Tensor:
    """exp_squash over the last dim (the Triton forward kernel)."""
    return squash_forward(s, 0.0, exp=True)


@exp_squash_op.register_fake
def _(s: Tensor) -> Tensor:
    return s.new_empty(s.shape)


@custom_op("fastcaps::exp_squash_backward")
def exp_squash_backward_op(s: Tensor, grad_v: Tensor) -> Tensor:
    """grad s of ``fastcaps::exp_squash`` (the Triton backward kernel)."""
    return squash_backward(s, grad_v, 0.0, exp=True)


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


exp_squash_op.register_autograd(_grad, setup_context=_setup)


@register_triton_op("exp_squash")
def exp_squash(s: Tensor, dim: int = -1) -> Tensor:
    """exp_squash along ``dim`` of any shape."""
    return exp_squash_op(s.movedim(dim, -1)).movedim(-1, dim)
