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
from fastcaps.kernels.predictions import (
    predictions_forward_kernel,
    predictions_grad_input_kernel,
    predictions_grad_weight_kernel,
)
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_launch import COMPILER_OPTIONS, batch_chunks, compute_dtype, pair_tiles


def predictions_forward(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat, contiguous, in u's dtype (fp32 accumulation; fp64 for float64)."""
    batch, n_in, d_in = u.shape
    _, n_out, d_out, _ = weight.shape
    u_hat = u.new_empty(batch, n_in, n_out, d_out)
    if u_hat.numel():
        tiles = pair_tiles(n_in, n_out, d_out)
        predictions_forward_kernel[(tiles.tiles(n_in) * batch,)](
            u, weight, u_hat, n_in, n_out, d_out, *u.stride(), *weight.stride(),
            DIN=d_in, COMPUTE_DTYPE=compute_dtype(u.dtype), BLOCK_I=tiles.block_i,
            BLOCK_J=tiles.block_j, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    return u_hat


def predictions_grad_input(grad_u_hat: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """grad u [B, Nin, Din] in ``dtype`` from grad u_hat [B, Nin, Nout, Dout] (any strides)."""
    batch, n_in, n_out, d_out = grad_u_hat.shape
    d_in = weight.shape[-1]
    grad_u = grad_u_hat.new_empty(batch, n_in, d_in, dtype=dtype)
    if grad_u.numel():
        tiles = pair_tiles(n_in, n_out, d_out)
        predictions_grad_input_kernel[(tiles.tiles(n_in) * batch,)](
            grad_u_hat, weight, grad_u, n_in, n_out, d_out, *grad_u_hat.stride(), *weight.stride(),
            DIN=d_in, COMPUTE_DTYPE=compute_dtype(dtype), BLOCK_I=tiles.block_i,
            BLOCK_J=tiles.block_j, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    return grad_u


def predictions_grad_weight(grad_u_hat: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    """grad weight [Nin, Nout, Dout, Din] in ``dtype``: a deterministic sum over the batch
    (per-chunk partial sums in the compute dtype, then one sum over the chunks)."""
    batch, n_in, n_out, d_out = grad_u_hat.shape
    d_in = u.shape[-1]
    if batch == 0:
        return grad_u_hat.new_zeros(n_in, n_out, d_out, d_in, dtype=dtype)
    tiles = pair_tiles(n_in, n_out, d_out)
    per_chunk = batch_chunks(batch, tiles.tiles(n_in))
    chunks = -(-batch // per_chunk)
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    partial = u.new_empty(chunks, n_in, n_out, d_out, d_in, dtype=work_dtype)
    predictions_grad_weight_kernel[(tiles.tiles(n_in) * chunks,)](
        grad_u_hat, u, partial, batch, n_in, n_out, d_out, per_chunk,
        *grad_u_hat.stride(), *u.stride(),
        DIN=d_in, COMPUTE_DTYPE=compute_dtype(dtype), BLOCK_I=tiles.block_i,
        BLOCK_J=tiles.block_j, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
            **COMPILER_OPTIONS,
    )  # fmt: skip
    return partial.sum(dim=0).to(dtype)


@torch.library.custom_op("fastcaps::predictions", mutates_args=())
def predictions_op(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat [B, Nin, Nout, Dout] (the Triton forward kernel)."""
    return predictions_forward(u, weight)


@predictions_op.register_fake
def _(u: Tensor, weight: Tensor) -> Tensor:
    return u.new_empty(u.shape[0], u.shape[1], weight.shape[1], weight.shape[2])


@torch.library.custom_op("fastcaps::predictions_backward", mutates_args=())
def predictions_backward_op(
    grad_u_hat: Tensor, u: Tensor, weight: Tensor, need_u: bool, need_weight: bool
) -> tuple[Tensor, Tensor]:
    """(grad u, grad weight); the ones not needed come back empty, uncomputed."""
    grad_u = predictions_grad_input(grad_u_hat, weight, u.dtype) if need_u else u.new_empty(0)
    grad_weight = (
        predictions_grad_weight(grad_u_hat, u, weight.dtype) if need_weight else weight.new_empty(0)
    )
    return grad_u, grad_weight


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


torch.library.register_autograd(
    "fastcaps::predictions", _predictions_grad, setup_context=_setup_predictions
)


@register_triton_op("predictions")
def predictions(u: Tensor, weight: Tensor) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] -> [B, Nin, Nout, Dout]."""
    return predictions_op(u, weight)
