"""predictions on Triton: host launchers, registered as the ``torch.library`` ops
``fastcaps::predictions`` and ``fastcaps::predictions_backward`` (autograd and fake
implementations included; kernels in fastcaps.kernels.predictions).

u [B, Nin, Din] x weight [Nin, Nout, Dout, Din] -> u_hat [B, Nin, Nout, Dout].
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.kernels.predictions import predictions_backward_kernel, predictions_forward_kernel
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_launch import compute_dtype, predictions_plan


def predictions_forward(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat, contiguous, in u's dtype (fp32 accumulation; fp64 for float64), tiled like the
    routing forward kernels (``triton_launch.predictions_plan``)."""
    batch, n_in, d_in = u.shape
    _, n_out, d_out, _ = weight.shape
    u_hat = u.new_empty(batch, n_in, n_out, d_out)
    if u_hat.numel():
        plan = predictions_plan(batch, n_in, n_out, d_out, d_in, u.dtype, u.device)
        tiling = plan.forward
        predictions_forward_kernel[(tiling.programs,)](
            u, weight, u_hat, batch, n_in, n_out, d_out, tiling.capsules_per_slice,
            plan.parent_chunks, *u.stride(), *weight.stride(), DIN=d_in,
            COMPUTE_DTYPE=compute_dtype(u.dtype), **plan.kernel_options(tiling),
        )  # fmt: skip
    return u_hat


def predictions_backward(
    grad_u_hat: Tensor, u: Tensor, weight: Tensor, need_u: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(grad u [B, Nin, Din] in u's dtype, grad weight [Nin, Nout, Dout, Din] in the weight's)
    from grad u_hat [B, Nin, Nout, Dout] (any strides), each None when not needed; one read of
    grad u_hat for both. grad weight is a deterministic sum over the batch (per-chunk partial
    sums in the compute dtype, then one sum over the chunks)."""
    batch, n_in, n_out, d_out = grad_u_hat.shape
    d_in = u.shape[-1]
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    if batch == 0 or not (need_u or need_weight):
        return (
            torch.empty(u.shape, dtype=u.dtype, device=u.device) if need_u else None,
            torch.zeros(weight.shape, dtype=weight.dtype, device=u.device) if need_weight else None,
        )
    plan = predictions_plan(batch, n_in, n_out, d_out, d_in, u.dtype, u.device)
    tiling = plan.pairs
    grad_u = grad_weight = None
    if need_u:
        grad_u = (
            u.new_empty(plan.parent_chunks, *u.shape, dtype=work)  # summed over the chunks after
            if plan.chunked
            else torch.empty(u.shape, dtype=u.dtype, device=u.device)
        )
    if need_weight:
        grad_weight = u.new_empty(tiling.chunks, *weight.shape, dtype=work)
    present = grad_u if grad_u is not None else grad_weight
    predictions_backward_kernel[(tiling.programs,)](
        grad_u_hat, u, weight, *(t if t is not None else present for t in (grad_u, grad_weight)),
        batch, n_in, n_out, d_out, tiling.capsules_per_slice, tiling.blocks_per_chunk,
        tiling.chunks, plan.parent_chunks, *grad_u_hat.stride(), *u.stride(), *weight.stride(),
        NEED_U=need_u, NEED_W=need_weight, CHUNKED=plan.chunked, DIN=d_in,
        COMPUTE_DTYPE=compute_dtype(u.dtype), **plan.kernel_options(tiling),
    )  # fmt: skip
    if grad_u is not None and plan.chunked:
        grad_u = grad_u.sum(dim=0).to(u.dtype)
    if grad_weight is not None:
        total = grad_weight[0] if grad_weight.shape[0] == 1 else grad_weight.sum(dim=0)
        grad_weight = total.to(weight.dtype)
    return grad_u, grad_weight


@custom_op("fastcaps::predictions")
def predictions_op(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat [B, Nin, Nout, Dout] (the Triton forward kernel)."""
    return predictions_forward(u, weight)


@predictions_op.register_fake
def _(u: Tensor, weight: Tensor) -> Tensor:
    return u.new_empty(u.shape[0], u.shape[1], weight.shape[1], weight.shape[2])


@custom_op("fastcaps::predictions_backward")
def predictions_backward_op(
    grad_u_hat: Tensor, u: Tensor, weight: Tensor, need_u: bool, need_weight: bool
) -> tuple[Tensor, Tensor]:
    """(grad u, grad weight); the ones not needed come back empty, uncomputed."""
    grad_u, grad_weight = predictions_backward(grad_u_hat, u, weight, need_u, need_weight)
    return (
        grad_u if grad_u is not None else u.new_empty(0),
        grad_weight if grad_weight is not None else weight.new_empty(0),
    )


@predictions_backward_op.register_fake
def _(grad_u_hat, u, weight, need_u, need_weight):
    return (
        u.new_empty(u.shape if need_u else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
    )


def _setup_predictions(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _predictions_grad(ctx, grad_u_hat: Tensor) -> tuple[Tensor | None, Tensor | None]:
    u, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return graph_grads(reference.predictions, (u, weight), grad_u_hat, ctx.needs_input_grad)
    need_u, need_weight = ctx.needs_input_grad
    grad_u, grad_weight = predictions_backward_op(grad_u_hat, u, weight, need_u, need_weight)
    return (grad_u if need_u else None), (grad_weight if need_weight else None)


predictions_op.register_autograd(_predictions_grad, setup_context=_setup_predictions)


@register_triton_op("predictions")
def predictions(u: Tensor, weight: Tensor) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] -> [B, Nin, Nout, Dout]."""
    return predictions_op(u, weight)
