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
u_hat: it saves u, weight and [Nin, B, Nout] + [B, Nout, D] of state and recomputes u_hat.
Math in float32 for half inputs, as everywhere in fastcaps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from fastcaps import reference
from fastcaps.torch_backend import (
    Radial,
    child_major_predictions,
    compute_dtype,
    graph_grads,
    plain_square_norm,
    scaled_polar,
    tangential_radial,
    without_autocast,
)

# ----------------------------------------------------------------------------------------------
# exp_squash along the last dim
# ----------------------------------------------------------------------------------------------


def exp_squash_factors(s: Tensor, slope: bool = True) -> Radial:
    """exp_squash's pieces per vector of the last dim, for any finite s: with r = |s|,
    g = 1 - exp(-r) (the output length), f = g / r (1 at s = 0) and g' = exp(-r) (f and g'
    None unless ``slope``). r from the plain sum of squares where that is exact
    (``plain_square_norm``), else from the scaled norm (it may round to inf: then g = 1,
    f = 0)."""
    n = plain_square_norm(s)
    if n is not None:
        r = n.sqrt()
        f = torch.expm1(-r).div_(r).neg_()  # in place: tiny layers are op-overhead bound
        if not slope:
            return Radial(s, n, f)
        return Radial(s, n, f, f, torch.exp(-r))
    u, r, _ = scaled_polar(s, inverse=False)
    g = -torch.expm1(-r)
    if not slope:
        return Radial(u, 1.0, g)
    f = torch.where(r > 0, g / torch.where(r > 0, r, 1.0), 1.0)
    return Radial(u, 1.0, g, f, torch.exp(-r))


def exp_squash_forward(s: Tensor) -> Tensor:
    return exp_squash_factors(s, slope=False).value()


def exp_squash_backward(s: Tensor, grad_v: Tensor) -> Tensor:
    """``f (gv - (u . gv) u) + g' (u . gv) u`` (``tangential_radial``): the identity at s = 0."""
    return tangential_radial(exp_squash_factors(s), grad_v)


class ExpSquashFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx: FunctionCtx, s: Tensor) -> Tensor:
        ctx.save_for_backward(s)
        return exp_squash_forward(s.to(compute_dtype(s.dtype))).to(s.dtype)

    @staticmethod
    @without_autocast
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


def _dot_over_d(x: Tensor, y: Tensor) -> Tensor:
    """[Nin, B, Nout, D] . [B, Nout, D] -> [Nin, B, Nout]. On a CPU a multiply and a sum (a
    batched matmul over B Nout pairs of [Nin, D] x [D] is slower there); elsewhere the batched
    matmul, which reads x once."""
    if x.device.type == "cpu":
        return (x * y).sum(dim=-1)
    return torch.einsum("ibjd,bjd->ibj", x, y)


def _sum_over_children(c: Tensor, x: Tensor) -> Tensor:
    """sum_i c[i] x[i]: [Nin, B, Nout] x [Nin, B, Nout, D] -> [B, Nout, D] (as ``_dot_over_d``)."""
    if x.device.type == "cpu":
        return (c.unsqueeze(-1) * x).sum(dim=0)
    return torch.einsum("ibj,ibjd->bjd", c, x)


def attention_forward(x: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: u_hat child-major, [Nin, B, Nout, D] (any strides), in the compute dtype. Returns v
    [B, Nout, D] and, for the backward, the scaled totals T / sqrt(D) [B, Nout, D], the softmax
    p [Nin, B, Nout] and s [B, Nout, D]. Child-major, a sum over the children is a sum over the
    outer dim."""
    totals = x.sum(dim=0) * (1.0 / math.sqrt(x.shape[-1]))
    p = torch.softmax(_dot_over_d(x, totals), dim=-1)
    c = p if prior is None else p + prior.unsqueeze(1)
    s = _sum_over_children(c, x)
    return exp_squash_forward(s), totals, p, s


def attention_backward(
    x: Tensor, prior: Tensor | None, totals: Tensor, p: Tensor, s: Tensor, grad_v: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``attention_forward``'s v: grad x [Nin, B, Nout, D] and the
    gradient of the coupling c [Nin, B, Nout] (its batch sum is the prior's gradient)."""
    grad_s = exp_squash_backward(s, grad_v)
    grad_c = _dot_over_d(x, grad_s)
    grad_a = p * (grad_c - (p * grad_c).sum(dim=-1, keepdim=True))
    c = p if prior is None else p + prior.unsqueeze(1)
    grad_x = c.unsqueeze(-1) * grad_s
    grad_x.addcmul_(grad_a.unsqueeze(-1), totals)  # totals are scaled by 1 / sqrt(D) already
    grad_a = grad_a * (1.0 / math.sqrt(x.shape[-1]))
    grad_x += _sum_over_children(grad_a, x)  # sum_k ga_k u_k / sqrt(D), through T
    return grad_x, grad_c


def _prior_grad(ctx: FunctionCtx, grad_c: Tensor, index: int, prior: Tensor | None):
    if prior is None or not ctx.needs_input_grad[index]:
        return None
    return grad_c.sum(dim=1).to(prior.dtype)


class AttentionRoutingFunction(torch.autograd.Function):
    """Saves u_hat (the input), the totals, the softmax and s: O(B Nin Nout) beyond the input."""

    @staticmethod
    @without_autocast
    def forward(ctx: FunctionCtx, u_hat: Tensor, prior: Tensor | None) -> Tensor:
        dtype = compute_dtype(u_hat.dtype)
        prior_c = None if prior is None else prior.to(dtype)
        v, totals, p, s = attention_forward(u_hat.to(dtype).transpose(0, 1), prior_c)
        ctx.save_for_backward(u_hat, prior, totals, p, s)
        return v.to(u_hat.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u_hat, prior, totals, p, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return graph_grads(reference.attention_routing, (u_hat, prior), grad_v,
                               ctx.needs_input_grad[:2])  # fmt: skip
        dtype = s.dtype
        prior_c = None if prior is None else prior.to(dtype)
        grad_x, grad_c = attention_backward(
            u_hat.to(dtype).transpose(0, 1), prior_c, totals, p, s, grad_v.to(dtype)
        )
        grad_u_hat = grad_x.transpose(0, 1).to(u_hat.dtype) if ctx.needs_input_grad[0] else None
        return grad_u_hat, _prior_grad(ctx, grad_c, 1, prior)


class CapsuleAttentionRoutingFunction(torch.autograd.Function):
    """Predictions + self-attention routing; saves u, weight and the small state, recomputes
    u_hat in backward."""

    @staticmethod
    @without_autocast
    def forward(ctx: FunctionCtx, u: Tensor, weight: Tensor, prior: Tensor | None) -> Tensor:
        dtype = compute_dtype(u.dtype)
        prior_c = None if prior is None else prior.to(dtype)
        x = child_major_predictions(u.to(dtype), weight.to(dtype))
        v, totals, p, s = attention_forward(x, prior_c)
        ctx.save_for_backward(u, weight, prior, totals, p, s)
        return v.to(u.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u, weight, prior, totals, p, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return graph_grads(reference.capsule_attention_routing, (u, weight, prior), grad_v,
                               ctx.needs_input_grad[:3])  # fmt: skip
        dtype = s.dtype
        u_c, weight_c = u.to(dtype), weight.to(dtype)
        prior_c = None if prior is None else prior.to(dtype)
        x = child_major_predictions(u_c, weight_c)
        grad_x, grad_c = attention_backward(x, prior_c, totals, p, s, grad_v.to(dtype))
        del x
        n_in, n_out, d_out, d_in = weight.shape
        grad_x = grad_x.reshape(n_in, u.shape[0], n_out * d_out)
        grad_u = grad_weight = None
        if ctx.needs_input_grad[0]:  # [Nin, B, Nout Dout] @ [Nin, Nout Dout, Din]
            w = weight_c.reshape(n_in, n_out * d_out, d_in)
            grad_u = torch.bmm(grad_x, w).transpose(0, 1).to(u.dtype)
        if ctx.needs_input_grad[1]:  # [Nin, Nout Dout, B] @ [Nin, B, Din]
            grad_weight = torch.bmm(grad_x.transpose(1, 2), u_c.transpose(0, 1))
            grad_weight = grad_weight.view(n_in, n_out, d_out, d_in).to(weight.dtype)
        return grad_u, grad_weight, _prior_grad(ctx, grad_c, 2, prior)


def attention_routing(u_hat: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Nout, Dout] (+ prior [Nin, Nout]) -> [B, Nout, Dout]."""
    return AttentionRoutingFunction.apply(u_hat, prior)


def capsule_attention_routing(u: Tensor, weight: Tensor, prior: Tensor | None = None) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] (+ prior [Nin, Nout]) -> [B, Nout, Dout]; u_hat is
    not saved."""
    return CapsuleAttentionRoutingFunction.apply(u, weight, prior)
