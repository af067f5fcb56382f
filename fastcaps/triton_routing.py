"""dynamic_routing on Triton: host launchers, registered as the ``torch.library`` ops
``fastcaps::dynamic_routing`` and ``fastcaps::dynamic_routing_backward`` (autograd and fake
implementations included; kernels in fastcaps.kernels.routing).

Forward is one launch for all iterations (one program per sample) and saves, besides u_hat, only
s and V = v_0 + ... + v_(r-1) per iteration: [R, B, Nout, Dout] each. Backward is two launches:
the per-sample state kernel (grad s of every iteration) and the pairs kernel (grad u_hat).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastcaps.backend import register_triton_op
from fastcaps.kernels.routing import (
    routing_backward_pairs_kernel,
    routing_backward_state_kernel,
    routing_forward_kernel,
)
from fastcaps.triton_launch import compute_dtype, pair_tiles
from fastcaps.triton_predictions import predictions_op


@dataclass
class PairSource:
    """Where the routing kernels read u_hat tiles from: a u_hat tensor, or (FROM_WEIGHT) u and
    weight, computing every tile on the fly. Supplies the matching kernel arguments."""

    u_hat: Tensor | None = None
    u: Tensor | None = None
    weight: Tensor | None = None

    @property
    def from_weight(self) -> bool:
        return self.u_hat is None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Nin, Nout, Dout)."""
        if self.u_hat is not None:
            return tuple(self.u_hat.shape)
        return (self.u.shape[0], self.u.shape[1], self.weight.shape[1], self.weight.shape[2])

    def pointer_args(self) -> tuple:
        """u_hat_ptr, u_ptr, w_ptr followed by the u_hat, u and weight strides (zeros for the
        tensors that are absent; their pointers are never read)."""
        any_tensor = self.u_hat if self.u_hat is not None else self.u
        ptrs = tuple(t if t is not None else any_tensor for t in (self.u_hat, self.u, self.weight))
        strides = (
            self.u_hat.stride() if self.u_hat is not None else (0,) * 4,
            self.u.stride() if self.u is not None else (0,) * 3,
            self.weight.stride() if self.weight is not None else (0,) * 4,
        )
        return ptrs + strides[0] + strides[1] + strides[2]

    @property
    def din(self) -> int:
        return 1 if self.weight is None else self.weight.shape[-1]


def routing_forward(
    source: PairSource, bias: Tensor | None, iterations: int, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """v [B, Nout, Dout] in ``dtype``; s_all and V_all [R, B, Nout, Dout] in the compute dtype."""
    batch, n_in, n_out, d_out = source.shape
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = (source.u_hat if source.u_hat is not None else source.u).device
    v = torch.empty(batch, n_out, d_out, dtype=dtype, device=device)
    s_all = torch.empty(iterations, batch, n_out, d_out, dtype=work_dtype, device=device)
    V_all = torch.empty_like(s_all)
    if batch:  # Nin >= 1 is validated by the public API
        tiles = pair_tiles(n_in, n_out, d_out)
        bias_arg = bias if bias is not None else v
        bias_strides = bias.stride() if bias is not None else (0, 0)
        routing_forward_kernel[(batch,)](
            *source.pointer_args()[:3], bias_arg, v, s_all, V_all, batch, n_in, n_out, d_out,
            iterations, eps, *source.pointer_args()[3:], *bias_strides,
            HAS_BIAS=bias is not None, FROM_WEIGHT=source.from_weight, DIN=source.din,
            COMPUTE_DTYPE=compute_dtype(dtype), BLOCK_I=tiles.block_i, BLOCK_J=tiles.block_j,
            BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )  # fmt: skip
    return v, s_all, V_all


def routing_backward_state(
    source: PairSource,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
) -> Tensor:
    """grad s of every iteration, [R, B, Nout, Dout] in the compute dtype."""
    iterations, batch, n_out, d_out = s_all.shape
    n_in = source.shape[1]
    grad_s_all = torch.zeros_like(s_all) if detach_logits else torch.empty_like(s_all)
    if batch:
        tiles = pair_tiles(n_in, n_out, d_out)
        routing_backward_state_kernel[(batch,)](
            *source.pointer_args()[:3], s_all, V_all, grad_v, grad_s_all, batch, n_in, n_out,
            d_out, iterations, eps, *source.pointer_args()[3:], *grad_v.stride(),
            DETACH_LOGITS=detach_logits, FROM_WEIGHT=source.from_weight, DIN=source.din,
            COMPUTE_DTYPE=compute_dtype(s_all.dtype), BLOCK_I=tiles.block_i,
            BLOCK_J=tiles.block_j, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )  # fmt: skip
    return grad_s_all


def routing_grad_u_hat(
    u_hat: Tensor, V_all: Tensor, grad_s_all: Tensor, detach_logits: bool
) -> Tensor:
    """grad u_hat [B, Nin, Nout, Dout], contiguous, in u_hat's dtype."""
    batch, n_in, n_out, d_out = u_hat.shape
    grad_u_hat = torch.empty(u_hat.shape, dtype=u_hat.dtype, device=u_hat.device)
    if grad_u_hat.numel():
        tiles = pair_tiles(n_in, n_out, d_out)
        routing_backward_pairs_kernel[(tiles.tiles(n_in), batch)](
            u_hat, V_all, grad_s_all, grad_u_hat, batch, n_in, n_out, d_out, V_all.shape[0],
            *u_hat.stride(), DETACH_LOGITS=detach_logits,
            COMPUTE_DTYPE=compute_dtype(V_all.dtype), BLOCK_I=tiles.block_i,
            BLOCK_J=tiles.block_j, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )  # fmt: skip
    return grad_u_hat


def bias_grad(ctx, grad_s_all: Tensor, bias_index: int) -> Tensor | None:
    """grad bias = sum over iterations and samples of grad s, when bias needs one."""
    if not ctx.needs_input_grad[bias_index]:
        return None
    return grad_s_all.sum(dim=(0, 1)).to(ctx.bias_dtype)


def routing_state_fake(batch: int, n_out: int, d_out: int, iterations: int, like: Tensor):
    """Fake (shape-only) v, s_all and V_all for ``torch.compile``."""
    work_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    v = like.new_empty(batch, n_out, d_out)
    s_all = like.new_empty(iterations, batch, n_out, d_out, dtype=work_dtype)
    return v, s_all, torch.empty_like(s_all)


def save_routing_options(ctx, bias: Tensor | None, detach_logits: bool, eps: float) -> None:
    ctx.detach_logits, ctx.eps = detach_logits, eps
    ctx.bias_dtype = None if bias is None else bias.dtype


@torch.library.custom_op("fastcaps::dynamic_routing", mutates_args=())
def dynamic_routing_op(
    u_hat: Tensor, bias: Tensor | None, iterations: int, detach_logits: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(v, s_all, V_all); ``detach_logits`` only matters to backward."""
    return routing_forward(PairSource(u_hat=u_hat), bias, iterations, eps, u_hat.dtype)


@dynamic_routing_op.register_fake
def _(u_hat, bias, iterations, detach_logits, eps):
    batch, _, n_out, d_out = u_hat.shape
    return routing_state_fake(batch, n_out, d_out, iterations, u_hat)


@torch.library.custom_op("fastcaps::dynamic_routing_backward", mutates_args=())
def dynamic_routing_backward_op(
    u_hat: Tensor,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
    need_u_hat: bool,
) -> tuple[Tensor, Tensor]:
    """(grad u_hat, or an empty tensor when not needed; grad s of every iteration)."""
    source = PairSource(u_hat=u_hat)
    grad_s_all = routing_backward_state(source, s_all, V_all, grad_v, detach_logits, eps)
    if not need_u_hat:
        return u_hat.new_empty(0), grad_s_all
    return routing_grad_u_hat(u_hat, V_all, grad_s_all, detach_logits), grad_s_all


@dynamic_routing_backward_op.register_fake
def _(u_hat, s_all, V_all, grad_v, detach_logits, eps, need_u_hat):
    return u_hat.new_empty(u_hat.shape if need_u_hat else (0,)), torch.empty_like(s_all)


def _setup_dynamic_routing(ctx, inputs: tuple, output: tuple) -> None:
    u_hat, bias, _, detach_logits, eps = inputs
    _, s_all, V_all = output
    ctx.save_for_backward(u_hat, s_all, V_all)
    save_routing_options(ctx, bias, detach_logits, eps)


def _dynamic_routing_grad(ctx, grad_v: Tensor, _grad_s_all, _grad_V_all):
    u_hat, s_all, V_all = ctx.saved_tensors
    need_u_hat = ctx.needs_input_grad[0]
    grad_u_hat, grad_s_all = dynamic_routing_backward_op(
        u_hat, s_all, V_all, grad_v, ctx.detach_logits, ctx.eps, need_u_hat
    )
    return (grad_u_hat if need_u_hat else None), bias_grad(ctx, grad_s_all, 1), None, None, None


torch.library.register_autograd(
    "fastcaps::dynamic_routing", _dynamic_routing_grad, setup_context=_setup_dynamic_routing
)


@register_triton_op("dynamic_routing")
def dynamic_routing(
    u_hat: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """[B, Nin, Nout, Dout] -> [B, Nout, Dout]."""
    return dynamic_routing_op(u_hat, bias, iterations, detach_logits, eps)[0]


def capsule_routing_unfused(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """The layer from the unfused kernels: predictions, then routing on the stored u_hat (for
    comparisons; ``capsule_routing`` with backend "triton" runs the fused layer)."""
    u_hat = predictions_op(u, weight)
    return dynamic_routing_op(u_hat, bias, iterations, detach_logits, eps)[0]
