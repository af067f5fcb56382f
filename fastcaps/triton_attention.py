"""Self-attention routing (Efficient-CapsNet) on Triton, registered as the ``torch.library`` ops
``fastcaps::attention_routing`` and ``fastcaps::capsule_attention_routing`` (with their
backward ops, autograd and fake implementations).

The routing kernels of ``fastcaps.kernels.routing`` run it as two passes over the input
capsules (``fastcaps.triton_routing.Attention``), each a partial-sum launch over slices of the
capsules and a combine launch:

1. the totals ``T_j = sum_i u_hat_ij`` (the uniform pass of dynamic routing without its 1/Nout);
   the combine keeps T and ``X = T / sqrt(Dout)``;
2. ``c_ij = softmax_j(u_hat_ij . X_j) + prior_ij``, ``s_j = sum_i c_ij u_hat_ij``; the combine
   writes ``v = exp_squash(s)``.

The agreement ``u_hat_ij . X_j`` is the row sum of parent j's self-attention matrix (the sum
over the other children moves inside the dot product), so no Nin x Nin matrix exists.
Backward: ``gs = exp_squash'(s) gv``; one partial pass gives ``gc_ij = u_hat_ij . gs_j`` (its
batch sum is the prior's gradient), ``ga = p (gc - sum_j p gc)`` (p the softmax) and
``grad X = sum_i ga_i u_hat_i``, so ``grad T = grad X / sqrt(Dout)``; the pairs kernel forms
``g_u_hat_ij = grad T_j + c_ij gs_j + ga_ij X_j`` per tile, stored as grad u_hat or, in the
capsule layer, contracted at once into grad u and grad weight. Saved for backward: the inputs
and s_all, V_all ([2, B, Nout, Dout] each: T and s, 0 and X); the capsule layer never stores
u_hat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcaps import reference
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.torch_backend import graph_grads
from fastcaps.triton_routing import (
    Attention,
    PairSource,
    routing_backward,
    routing_forward,
    routing_state_fake,
)


def _forward(source: PairSource, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    attention = Attention(prior)
    return routing_forward(source, None, attention.iterations, 0.0, source.tensor.dtype,
                           attention)  # fmt: skip


def _backward(source: PairSource, prior, s_all, V_all, grad_v, need_inputs: bool):
    return routing_backward(source, s_all, V_all, grad_v, False, 0.0, need_inputs,
                            Attention(prior))  # fmt: skip


def _prior_grad_or_empty(grad_prior: Tensor | None, like: Tensor) -> Tensor:
    return grad_prior if grad_prior is not None else like.new_empty(0)


def _prior_grad_fake(prior: Tensor | None, like: Tensor) -> Tensor:
    return torch.empty_like(prior) if prior is not None else like.new_empty(0)


# ----------------------------------------------------------------------------------------------
# attention_routing: on a stored u_hat
# ----------------------------------------------------------------------------------------------


@custom_op("fastcaps::attention_routing")
def attention_routing_op(u_hat: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(v, s_all, V_all)."""
    return _forward(PairSource(u_hat=u_hat), prior)


@attention_routing_op.register_fake
def _(u_hat, prior):
    batch, _, n_out, d_out = u_hat.shape
    return routing_state_fake(batch, n_out, d_out, Attention.iterations, u_hat)


@custom_op("fastcaps::attention_routing_backward")
def attention_routing_backward_op(
    u_hat: Tensor,
    prior: Tensor | None,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    need_u_hat: bool,
) -> tuple[Tensor, Tensor]:
    """(grad u_hat, or an empty tensor when not needed; grad prior, or an empty tensor when
    there is no prior)."""
    grads = _backward(PairSource(u_hat=u_hat), prior, s_all, V_all, grad_v, need_u_hat)
    grad_u_hat = grads.grad_u_hat if need_u_hat else u_hat.new_empty(0)
    return grad_u_hat, _prior_grad_or_empty(grads.grad_prior, u_hat)


@attention_routing_backward_op.register_fake
def _(u_hat, prior, s_all, V_all, grad_v, need_u_hat):
    return u_hat.new_empty(u_hat.shape if need_u_hat else (0,)), _prior_grad_fake(prior, u_hat)


def _setup_attention_routing(ctx, inputs: tuple, output: tuple) -> None:
    u_hat, prior = inputs
    _, s_all, V_all = output
    ctx.save_for_backward(u_hat, prior, s_all, V_all)


def _attention_routing_grad(ctx, grad_v: Tensor, _grad_s_all, _grad_V_all):
    u_hat, prior, s_all, V_all = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return graph_grads(reference.attention_routing, (u_hat, prior), grad_v, needs)
    grad_u_hat, grad_prior = attention_routing_backward_op(
        u_hat, prior, s_all, V_all, grad_v, needs[0]
    )
    return (grad_u_hat if needs[0] else None), (grad_prior if needs[1] else None)


attention_routing_op.register_autograd(
    _attention_routing_grad, setup_context=_setup_attention_routing
)


@register_triton_op("attention_routing")
def attention_routing(u_hat: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Nout, Dout] (+ prior [Nin, Nout]) -> [B, Nout, Dout]."""
    return attention_routing_op(u_hat, prior)[0]


# ----------------------------------------------------------------------------------------------
# capsule_attention_routing: u_hat recomputed from u and weight, never stored
# ----------------------------------------------------------------------------------------------


@custom_op("fastcaps::capsule_attention_routing")
def capsule_attention_routing_op(
    u: Tensor, weight: Tensor, prior: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(v, s_all, V_all) of the fused layer."""
    return _forward(PairSource(u=u, weight=weight), prior)


@capsule_attention_routing_op.register_fake
def _(u, weight, prior):
    return routing_state_fake(u.shape[0], weight.shape[1], weight.shape[2],
                              Attention.iterations, u)  # fmt: skip


@custom_op("fastcaps::capsule_attention_routing_backward")
def capsule_attention_routing_backward_op(
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad u, grad weight, grad prior or an empty tensor when there is no prior)."""
    grads = _backward(PairSource(u=u, weight=weight), prior, s_all, V_all, grad_v, True)
    return grads.grad_u, grads.grad_weight, _prior_grad_or_empty(grads.grad_prior, u)


@capsule_attention_routing_backward_op.register_fake
def _(u, weight, prior, s_all, V_all, grad_v):
    return u.new_empty(u.shape), weight.new_empty(weight.shape), _prior_grad_fake(prior, u)


def _setup_capsule_attention_routing(ctx, inputs: tuple, output: tuple) -> None:
    u, weight, prior = inputs
    _, s_all, V_all = output
    ctx.save_for_backward(u, weight, prior, s_all, V_all)


def _capsule_attention_routing_grad(ctx, grad_v: Tensor, _grad_s_all, _grad_V_all):
    u, weight, prior, s_all, V_all = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return graph_grads(reference.capsule_attention_routing, (u, weight, prior), grad_v, needs)
    grads = capsule_attention_routing_backward_op(u, weight, prior, s_all, V_all, grad_v)
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


capsule_attention_routing_op.register_autograd(
    _capsule_attention_routing_grad,
    setup_context=_setup_capsule_attention_routing,
)


@register_triton_op("capsule_attention_routing")
def capsule_attention_routing(u: Tensor, weight: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] (+ prior [Nin, Nout]) -> [B, Nout, Dout]; u_hat is
    never stored."""
    return capsule_attention_routing_op(u, weight, prior)[0]
