"""Plain PyTorch reference, written straight from the papers: dynamic routing (Sabour, Frosst &
Hinton 2017) and self-attention routing (Mazzia, Salvetti & Chiaberge 2021, Efficient-CapsNet).

This module is the oracle that every backend is tested against. It favours being obviously
correct over being fast: no custom autograd, no layout tricks, no input validation.

Shapes:
    u       [B, Nin, Din]              input (child) capsules
    weight  [Nin, Nout, Dout, Din]     one transform per (child, parent) pair
    u_hat   [B, Nin, Nout, Dout]       prediction vectors
    bias    [Nout, Dout] or None
    prior   [Nin, Nout] or None         self-attention routing's learned coupling prior
    v       [B, Nout, Dout]            output (parent) capsules
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def _math(t: Tensor) -> Tensor:
    """float16/bfloat16 are computed in float32, like the other backends (eps = 1e-8 underflows
    in float16 and squared norms overflow above 256)."""
    return t.float() if t.dtype in HALF else t


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Eq. 1: ``v = |s|^2 / (1 + |s|^2) * s / |s|``, with ``eps`` keeping s = 0 finite. (Plain:
    in float32 ``(1 + n) sqrt(n + eps)`` overflows from |s| ~ 7e12, giving NaN; the other
    backends are exact for every finite s.)"""
    x = _math(s)
    n = (x * x).sum(dim=dim, keepdim=True)
    return (x * n / ((1 + n) * torch.sqrt(n + eps))).to(s.dtype)


def predictions(u: Tensor, weight: Tensor) -> Tensor:
    """``u_hat[b, i, j] = weight[i, j] @ u[b, i]``: [B, Nin, Din] -> [B, Nin, Nout, Dout]."""
    return torch.einsum("ijdk,bik->bijd", weight, u)


def dynamic_routing(
    u_hat: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Procedure 1 (routing by agreement): [B, Nin, Nout, Dout] -> [B, Nout, Dout].

    Logits start at zero, one set per sample. Each iteration takes a softmax over the parent
    capsules, forms ``s_j = sum_i c_ij u_hat_ij (+ bias_j)``, squashes it, and (except after the
    last iteration) adds the agreement ``u_hat_ij . v_j`` to the logits. With
    ``detach_logits`` the logits are constants for backward, so gradients flow only through the
    final weighted sum.
    """
    out_dtype = u_hat.dtype
    u_hat = _math(u_hat)
    bias = None if bias is None else bias.to(u_hat.dtype)
    batch, n_in, n_out, _ = u_hat.shape
    logits = u_hat.new_zeros(batch, n_in, n_out)
    for r in range(iterations):
        c = F.softmax(logits, dim=2)  # over the parents j, separately for every child i
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)
        if bias is not None:
            s = s + bias
        v = squash(s, eps=eps)
        if r < iterations - 1:
            agreement = (u_hat * v.unsqueeze(1)).sum(dim=-1)
            logits = logits + (agreement.detach() if detach_logits else agreement)
    return v.to(out_dtype)


def capsule_routing(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """A whole routing layer: ``dynamic_routing(predictions(u, weight), ...)``."""
    return dynamic_routing(
        predictions(u, weight), iterations, bias, detach_logits=detach_logits, eps=eps
    )


def exp_squash(s: Tensor, dim: int = -1) -> Tensor:
    """Efficient-CapsNet's squash: ``v = (1 - exp(-|s|)) s / |s|`` (0 at s = 0, where its
    Jacobian is the identity)."""
    x = _math(s)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    factor = torch.where(norm > 0, -torch.expm1(-safe) / safe, torch.ones_like(norm))
    return (factor * x).to(s.dtype)


def attention_routing(u_hat: Tensor, prior: Tensor | None = None) -> Tensor:
    """Self-attention routing (Efficient-CapsNet, Eq. 7-10): [B, Nin, Nout, Dout] ->
    [B, Nout, Dout], forming the whole Nin x Nin attention matrix per sample and parent.

    ``A_j = U_j U_j^T / sqrt(Dout)`` with ``U_j`` the [Nin, Dout] predictions for parent j; the
    agreement of child i is the row sum of ``A_j``; the coupling is its softmax over the parents
    plus ``prior[i, j]``; ``s_j = sum_i c_ij u_hat_ij`` and ``v = exp_squash(s)``.
    """
    out_dtype = u_hat.dtype
    x = _math(u_hat)
    per_parent = x.permute(0, 2, 1, 3)  # [B, Nout, Nin, Dout]
    attention = per_parent @ per_parent.transpose(-1, -2) / math.sqrt(x.shape[-1])
    agreement = attention.sum(dim=-1)  # [B, Nout, Nin]
    c = F.softmax(agreement, dim=1)  # over the parents j, separately for every child i
    if prior is not None:
        c = c + prior.to(x.dtype).T
    s = (c.unsqueeze(-1) * per_parent).sum(dim=2)
    return exp_squash(s).to(out_dtype)


def capsule_attention_routing(u: Tensor, weight: Tensor, prior: Tensor | None = None) -> Tensor:
    """A self-attention routing layer: ``attention_routing(predictions(u, weight), prior)``."""
    return attention_routing(predictions(u, weight), prior)


def margin_loss(
    lengths: Tensor,
    target: Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> Tensor:
    """Eq. 4, summed over classes and averaged over the batch.

    ``lengths`` is [B, classes]; ``target`` holds class indices [B] or a one-hot [B, classes].
    """
    if target.dim() == 1:
        target = F.one_hot(target.long(), lengths.shape[-1])
    target = target.to(lengths.dtype)
    present = target * F.relu(m_pos - lengths) ** 2
    absent = lam * (1 - target) * F.relu(lengths - m_neg) ** 2
    return _batch_mean((present + absent).sum(dim=-1))


def reconstruction_loss(reconstructions: Tensor, images: Tensor, scale: float = 0.0005) -> Tensor:
    """Sum of squared errors per image times ``scale``, averaged over the batch."""
    diff = reconstructions.flatten(1) - images.flatten(1)
    return scale * _batch_mean((diff * diff).sum(dim=1))


def _batch_mean(per_sample: Tensor) -> Tensor:
    """The mean over the batch; 0 for an empty batch (still connected to the graph)."""
    return per_sample.sum() / max(per_sample.shape[0], 1)
