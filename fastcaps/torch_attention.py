"""Self-attention routing (Efficient-CapsNet) in PyTorch, exact in O(Nin).

The agreement of child i with parent j is the row sum of the parent's self-attention matrix,
``a_ij = sum_k u_ij . u_kj / sqrt(D)``. The sum moves inside the dot product:
``a_ij = u_ij . (sum_k u_kj) / sqrt(D) = u_ij . T_j / sqrt(D)``, so one [B, Nout, D] total per
sample replaces the [B, Nout, Nin, Nin] matrix: O(Nin) work and memory, and the same numbers.

Forward: ``T = sum_i u_i``, ``a = u . T / sqrt(D)``, ``c = softmax_j(a) + prior``,
``s = sum_i c_i u_i``, ``v = exp_squash(s)``. Backward, with ``gs = exp_squash'(s)^T gv``:
``gc_i = u_i . gs``, ``ga = p (gc - sum_j p gc)`` (p the softmax), and
``gu_i = c_i gs + (ga_i T + sum_k ga_k u_k) / sqrt(D)`` (the last term because T depends on
every child). Nothing of size B x Nin x Nin exists, and the capsule layer does not even keep
u_hat: it saves u, weight and [B, Nin, Nout] + [B, Nout, D] of state and recomputes u_hat.
Math in float32 for half inputs, as everywhere in fastcaps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from fastcaps import reference
from fastcaps.torch_backend import compute_dtype, directions, graph_grads, tangential_radial

# ----------------------------------------------------------------------------------------------
# exp_squash along the last dim
# ----------------------------------------------------------------------------------------------


def exp_squash_factors(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """exp_squash's pieces per vector of the last dim, for any finite s: u = s / |s| (0 for a
    zero vector), g = 1 - exp(-|s|) (the output length), f = g / |s| (1 at s = 0) and
    g' = exp(-|s|); the last three [..., 1]. The norm is taken of s scaled by its largest
    entry, so it neither overflows nor underflows; |s| itself may round to inf (then g = 1,
    f = 0)."""
    m, t_norm, u = directions(s)
    r = m * t_norm
    g = -torch.expm1(-r)
    f = torch.where(r > 0, g / torch.where(r > 0, r, 1.0), 1.0)
    return u, g, f, torch.exp(-r)


def exp_squash_forward(s: Tensor) -> Tensor:
    u, g, _, _ = exp_squash_factors(s)
    return g * u


def exp_squash_backward(s: Tensor, grad_v: Tensor) -> Tensor:
    """``f (gv - (u . gv) u) + g' (u . gv) u``: the tangential and radial parts (the identity
    at s = 0)."""
    u, _, f, dg = exp_squash_factors(s)
    return tangential_radial(u, f, dg, grad_v)


class ExpSquashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, s: Tensor) -> Tensor:
        ctx.save_for_backward(s)
        return exp_squash_forward(s.to(compute_dtype(s.dtype))).to(s.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_v: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return graph_grads(reference.exp_squash, (s,), grad_v, (True,))[0]
        dtype = compute_dtype(s.dtype)
        return exp_squash_backward(s.to(dtype), grad_v.to(dtype)).to(s.dtype)


def exp_squash(s: Tensor, dim: int = -1) -> Tensor:
    """exp_squash along ``dim`` of any shape."""
    return ExpSquashFunction.apply(s.movedim(dim, -1)).movedim(-1, dim)


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------


def attention_forward(x: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: u_hat [B, Nin, Nout, D] in the compute dtype. Returns v [B, Nout, D] and, for the
    backward, the totals T [B, Nout, D], the softmax p [B, Nin, Nout] and s [B, Nout, D]."""
    scale = 1.0 / math.sqrt(x.shape[-1])
    totals = x.sum(dim=1)
    agreement = torch.einsum("bijd,bjd->bij", x, totals) * scale
    p = torch.softmax(agreement, dim=2)
    c = p if prior is None else p + prior
    s = torch.einsum("bij,bijd->bjd", c, x)
    return exp_squash_forward(s), totals, p, s


def attention_backward(
    x: Tensor, prior: Tensor | None, totals: Tensor, p: Tensor, s: Tensor, grad_v: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``attention_forward``'s v: grad u_hat [B, Nin, Nout, D] and the gradient of
    the coupling c [B, Nin, Nout] (its batch sum is the prior's gradient)."""
    scale = 1.0 / math.sqrt(x.shape[-1])
    grad_s = exp_squash_backward(s, grad_v)
    grad_c = torch.einsum("bijd,bjd->bij", x, grad_s)
    grad_a = p * (grad_c - (p * grad_c).sum(dim=2, keepdim=True)) * scale
    through_totals = torch.einsum("bij,bijd->bjd", grad_a, x)  # sum_k ga_k u_k
    c = p if prior is None else p + prior
    grad_x = c.unsqueeze(-1) * grad_s.unsqueeze(1)
    grad_x.addcmul_(grad_a.unsqueeze(-1), totals.unsqueeze(1))
    grad_x.add_(through_totals.unsqueeze(1))
    return grad_x, grad_c


def _prior_grad(ctx: FunctionCtx, grad_c: Tensor, index: int, prior: Tensor | None):
    if prior is None or not ctx.needs_input_grad[index]:
        return None
    return grad_c.sum(dim=0).to(prior.dtype)


class AttentionRoutingFunction(torch.autograd.Function):
    """Saves u_hat (the input), the totals, the softmax and s: O(B Nin Nout) beyond the input."""

    @staticmethod
    def forward(ctx: FunctionCtx, u_hat: Tensor, prior: Tensor | None) -> Tensor:
        dtype = compute_dtype(u_hat.dtype)
        prior_c = None if prior is None else prior.to(dtype)
        v, totals, p, s = attention_forward(u_hat.to(dtype), prior_c)
        ctx.save_for_backward(u_hat, prior, totals, p, s)
        return v.to(u_hat.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u_hat, prior, totals, p, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return graph_grads(reference.attention_routing, (u_hat, prior), grad_v,
                               ctx.needs_input_grad[:2])  # fmt: skip
        dtype = s.dtype
        prior_c = None if prior is None else prior.to(dtype)
        grad_x, grad_c = attention_backward(
            u_hat.to(dtype), prior_c, totals, p, s, grad_v.to(dtype)
        )
        grad_u_hat = grad_x.to(u_hat.dtype) if ctx.needs_input_grad[0] else None
        return grad_u_hat, _prior_grad(ctx, grad_c, 1, prior)


class CapsuleAttentionRoutingFunction(torch.autograd.Function):
    """Predictions + self-attention routing; saves u, weight and the small state, recomputes
    u_hat in backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, u: Tensor, weight: Tensor, prior: Tensor | None) -> Tensor:
        dtype = compute_dtype(u.dtype)
        prior_c = None if prior is None else prior.to(dtype)
        x = torch.einsum("ijdk,bik->bijd", weight.to(dtype), u.to(dtype))
        v, totals, p, s = attention_forward(x, prior_c)
        ctx.save_for_backward(u, weight, prior, totals, p, s)
        return v.to(u.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u, weight, prior, totals, p, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return graph_grads(reference.capsule_attention_routing, (u, weight, prior), grad_v,
                               ctx.needs_input_grad[:3])  # fmt: skip
        dtype = s.dtype
        u_c, weight_c = u.to(dtype), weight.to(dtype)
        prior_c = None if prior is None else prior.to(dtype)
        x = torch.einsum("ijdk,bik->bijd", weight_c, u_c)
        grad_x, grad_c = attention_backward(x, prior_c, totals, p, s, grad_v.to(dtype))
        del x
        grad_u = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.einsum("bijd,ijdk->bik", grad_x, weight_c).to(u.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.einsum("bijd,bik->ijdk", grad_x, u_c).to(weight.dtype)
        return grad_u, grad_weight, _prior_grad(ctx, grad_c, 2, prior)


def attention_routing(u_hat: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Nout, Dout] (+ prior [Nin, Nout]) -> [B, Nout, Dout]."""
    return AttentionRoutingFunction.apply(u_hat, prior)


def capsule_attention_routing(u: Tensor, weight: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] (+ prior [Nin, Nout]) -> [B, Nout, Dout]; u_hat is
    not saved."""
    return CapsuleAttentionRoutingFunction.apply(u, weight, prior)
