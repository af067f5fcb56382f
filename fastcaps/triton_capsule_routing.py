"""The fused capsule layer on Triton: prediction vectors and every routing iteration computed
from u and weight inside the kernels, so u_hat is never stored.

Why: at the MNIST shape (B=128, 1152 -> 10 x 16, Din 8) u_hat is 94 MB in float32, and the layer
is bound by memory traffic, not arithmetic. A u_hat vector is cheap to recompute (a 16 x 8
matrix times an 8-vector), so, as flash-attention does for attention scores, the kernels rebuild
u_hat tiles in registers whenever they need them.

The kernels are those of ``fastcaps.triton_routing`` with FROM_WEIGHT (see
``fastcaps.kernels.routing`` for the tiling): every program owns a block of samples and a slice
of input capsules and forms each u_hat tile as ``U_i @ W_i^T`` on ``tl.dot``.

Forward, per iteration r = 0 .. R-1: partial sums over the slices, then a combine launch,

    c_r,ij = softmax_j(u_hat_ij . V_r,j),   s_r,j = sum_i c_r,ij u_hat_ij (+ bias_j),
    v_r = squash(s_r),                       V_(r+1) = V_r + v_r,   V_0 = 0.

The logits after r iterations are exactly ``u_hat_ij . V_r,j`` (Procedure 1 adds
``u_hat_ij . v_t,j`` once per earlier iteration t, and the dot product is linear), so they are
never stored. Saved: s_r and V_r of every iteration ([R, B, Nout, Dout] each, in the compute
dtype).

Backward, for r = R-1 .. 1 with go_r the gradient reaching v_r (go_(R-1) = grad v):
``gs_r = squash'(s_r) go_r``; a partial pass rebuilding u_hat and c_r gives
``gc_r,ij = u_hat_ij . gs_r,j``, ``ga_r = c_r (gc_r - sum_j c_r gc_r)`` and
``gV_r = sum_i ga_r,ij u_hat_ij``, which reaches every earlier output (go_t += gV_r for t < r).
Then the pairs kernel forms ``g_u_hat_ij = sum_r (c_r,ij gs_r,j + ga_r,ij V_r,j)`` per tile and
contracts it at once, on ``tl.dot``, into ``grad u_i = g_u_hat_i @ W_i`` and into grad W
(per batch chunk, summed by the host: deterministic, no atomics, float32 even for half inputs).
With detach_logits only the last iteration's weighted sum is differentiated.

Why it is exact: every quantity is recomputed from the same inputs with the same arithmetic as
in forward (u_hat, then c_r from V_r, which was saved), so backward differentiates exactly the
function forward evaluated; the equations are the chain rule through Procedure 1 with the
logits written as u_hat . V. Tests compare values and the gradients of u, weight and bias with
``fastcaps.reference`` (float64 and float32, 1-4 iterations, bias, detach_logits, odd sizes)
and run ``gradcheck``.

Memory: saved for backward are u, weight, s_all and V_all. The largest buffers of the backward
are the coefficients c_r and ga_r kept for the pairs kernel (2 (R-1) B Nin Nout values, only
while that is at most half of u_hat's size, ``store_coefficients``), grad u, grad weight and its
partial sums; nothing of u_hat's size exists at any time (``tests/test_fused_layer.py`` checks
the saved tensors and every CPU allocation), except in layers whose whole u_hat is under
``triton_launch.SMALL_SPLIT_BYTES`` (16 MiB), which may split into more partial sums to fill
the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.torch_backend import routing_graph_grads
from fastcaps.triton_routing import (
    PairSource,
    bias_grad,
    routing_backward,
    routing_forward,
    routing_state_fake,
    save_routing_options,
)


@custom_op("fastcaps::capsule_routing")
def capsule_routing_op(
    u: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    iterations: int,
    detach_logits: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(v, s_all, V_all) of the fused layer; ``detach_logits`` only matters to backward."""
    return routing_forward(PairSource(u=u, weight=weight), bias, iterations, eps, u.dtype)


@capsule_routing_op.register_fake
def _(u, weight, bias, iterations, detach_logits, eps):
    return routing_state_fake(u.shape[0], weight.shape[1], weight.shape[2], iterations, u)


@custom_op("fastcaps::capsule_routing_backward")
def capsule_routing_backward_op(
    u: Tensor,
    weight: Tensor,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad u, grad weight, grad s of every iteration)."""
    source = PairSource(u=u, weight=weight)
    grads = routing_backward(source, s_all, V_all, grad_v, detach_logits, eps)
    return grads.grad_u, grads.grad_weight, grads.grad_s_all


@capsule_routing_backward_op.register_fake
def _(u, weight, s_all, V_all, grad_v, detach_logits, eps):
    return u.new_empty(u.shape), weight.new_empty(weight.shape), torch.empty_like(s_all)


def _setup_capsule_routing(ctx, inputs: tuple, output: tuple) -> None:
    u, weight, bias, iterations, detach_logits, eps = inputs
    _, s_all, V_all = output
    ctx.save_for_backward(u, weight, s_all, V_all, bias)
    save_routing_options(ctx, bias, iterations, detach_logits, eps)


def _capsule_routing_grad(ctx, grad_v: Tensor, _grad_s_all, _grad_V_all):
    u, weight, s_all, V_all, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return routing_graph_grads(ctx, reference.capsule_routing, (u, weight, bias), grad_v)
    grad_u, grad_weight, grad_s_all = capsule_routing_backward_op(
        u, weight, s_all, V_all, grad_v, ctx.detach_logits, ctx.eps
    )
    need_u, need_weight = ctx.needs_input_grad[:2]
    return (
        grad_u if need_u else None,
        grad_weight if need_weight else None,
        bias_grad(ctx, grad_s_all, 2),
        None,
        None,
        None,
    )


capsule_routing_op.register_autograd(_capsule_routing_grad, setup_context=_setup_capsule_routing)


@register_triton_op("capsule_routing")
def capsule_routing(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] -> [B, Nout, Dout]; u_hat is never stored."""
    return capsule_routing_op(u, weight, bias, iterations, detach_logits, eps)[0]
