"""The functional API: validates arguments, then runs the chosen backend.

Shapes:
    u       [B, Nin, Din]              input capsules
    weight  [Nin, Nout, Dout, Din]     transform matrices
    u_hat   [B, Nin, Nout, Dout]       prediction vectors
    bias    [Nout, Dout] or None
    prior   [Nin, Nout] or None        self-attention routing's coupling prior
    v       [B, Nout, Dout]            output capsules

``backend``: None (``$FASTCAPS_BACKEND``, else "auto"), "auto", "torch", "triton" or "reference";
see ``fastcaps.backend``.
"""

from __future__ import annotations

import math

from torch import Tensor

from fastcaps import reference
from fastcaps._validation import (
    check_bias,
    check_iterations,
    check_prediction_inputs,
    check_prior,
    check_same_device_and_dtype,
    check_tensor,
    check_u_hat,
)
from fastcaps.backend import implementation


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8, *, backend: str | None = None) -> Tensor:
    """``v = s * n / ((1 + n) * sqrt(n + eps))`` with ``n = sum(s * s, dim)``; any shape.

    Value and gradient are finite at s = 0 (both are 0 there).
    """
    _check_vectors(s, dim)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps squash finite at s = 0), got {eps!r}")
    return implementation("squash", backend, s)(s, dim, eps)


def exp_squash(s: Tensor, dim: int = -1, *, backend: str | None = None) -> Tensor:
    """Efficient-CapsNet's squash, ``v = (1 - exp(-|s|)) s / |s|`` with ``|s|`` the norm over
    ``dim``; any shape. 0 at s = 0, where its Jacobian is the identity."""
    _check_vectors(s, dim)
    return implementation("exp_squash", backend, s)(s, dim)


def _check_vectors(s: Tensor, dim: int) -> None:
    if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() < 1:
        got = f"dtype {s.dtype}, shape {tuple(s.shape)}" if isinstance(s, Tensor) else type(s)
        raise ValueError(f"s must be a floating-point tensor with at least 1 dim, got {got}")
    if not -s.dim() <= dim < s.dim():
        raise ValueError(
            f"dim must be in [{-s.dim()}, {s.dim() - 1}] for s of shape {tuple(s.shape)}, got {dim}"
        )


def predictions(u: Tensor, weight: Tensor, *, backend: str | None = None) -> Tensor:
    """Prediction vectors ``u_hat[b, i, j] = weight[i, j] @ u[b, i]``: [B, Nin, Nout, Dout].

    The result may be strided: the torch backend returns a transposed view of its
    [Nin, B, Nout, Dout] matmul result, as ``torch.einsum`` would (``.contiguous()`` copies it).
    """
    check_prediction_inputs(u, weight)
    return implementation("predictions", backend, u)(u, weight)


def _check_routing_options(
    iterations: int, bias: Tensor | None, n_out: int, d_out: int, **tensors: Tensor
) -> None:
    check_iterations(iterations)
    check_bias(bias, n_out, d_out)
    check_same_device_and_dtype(**tensors, bias=bias)


def dynamic_routing(
    u_hat: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Routing by agreement (Sabour et al. 2017, Procedure 1):
    [B, Nin, Nout, Dout] -> [B, Nout, Dout].

    Logits start at zero, one set per sample; each iteration ``c = softmax(b)`` over the Nout
    parents, ``s_j = sum_i c_ij u_hat_ij (+ bias_j)``, ``v = squash(s)`` and, except after the
    last, ``b_ij += u_hat_ij . v_j``. Gradients flow through every iteration; with
    ``detach_logits=True`` the coefficients are constants for backward.
    """
    check_u_hat(u_hat)
    _, _, n_out, d_out = u_hat.shape
    _check_routing_options(iterations, bias, n_out, d_out, u_hat=u_hat)
    run = implementation("dynamic_routing", backend, u_hat)
    return run(u_hat, iterations, bias, detach_logits=detach_logits)


def capsule_routing(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    backend: str | None = None,
) -> Tensor:
    """A whole routing layer, ``dynamic_routing(predictions(u, weight), ...)``: [B, Nin, Din] ->
    [B, Nout, Dout]. The torch backend saves only u, weight and [R, B, Nout, Dout] of state for
    backward and recomputes u_hat there."""
    check_prediction_inputs(u, weight)
    _, n_out, d_out, _ = weight.shape
    _check_routing_options(iterations, bias, n_out, d_out, u=u, weight=weight)
    run = implementation("capsule_routing", backend, u)
    return run(u, weight, iterations, bias, detach_logits=detach_logits)


def attention_routing(
    u_hat: Tensor, prior: Tensor | None = None, *, backend: str | None = None
) -> Tensor:
    """Self-attention routing (Mazzia et al. 2021, Efficient-CapsNet):
    [B, Nin, Nout, Dout] -> [B, Nout, Dout].

    ``a_ij = sum_k u_hat_ij . u_hat_kj / sqrt(Dout)`` (row sums of each parent's self-attention
    matrix), ``c_ij = softmax_j(a_ij) + prior_ij``, ``v_j = exp_squash(sum_i c_ij u_hat_ij)``.
    Computed exactly in O(Nin): ``a_ij = u_hat_ij . (sum_k u_hat_kj) / sqrt(Dout)``.
    """
    check_u_hat(u_hat)
    _, n_in, n_out, _ = u_hat.shape
    check_prior(prior, n_in, n_out)
    check_same_device_and_dtype(u_hat=u_hat, prior=prior)
    return implementation("attention_routing", backend, u_hat)(u_hat, prior)


def capsule_attention_routing(
    u: Tensor, weight: Tensor, prior: Tensor | None = None, *, backend: str | None = None
) -> Tensor:
    """A whole self-attention routing layer, ``attention_routing(predictions(u, weight), prior)``:
    [B, Nin, Din] -> [B, Nout, Dout]. The torch backend saves u, weight and O(B Nin Nout) of
    state for backward and recomputes u_hat there."""
    check_prediction_inputs(u, weight)
    n_in, n_out, _, _ = weight.shape
    check_prior(prior, n_in, n_out)
    check_same_device_and_dtype(u=u, weight=weight, prior=prior)
    return implementation("capsule_attention_routing", backend, u)(u, weight, prior)


def margin_loss(
    lengths: Tensor,
    target: Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> Tensor:
    """Margin loss (Eq. 4) summed over classes, averaged over the batch (0 for an empty batch).

    ``lengths`` [B, classes] are the output capsule lengths; ``target`` is [B] class indices or a
    [B, classes] one-hot (or soft) target.
    """
    check_tensor("lengths", lengths, 2, "[B, classes]")
    batch, classes = lengths.shape
    if not isinstance(target, Tensor):
        raise ValueError(
            "target must be a tensor of class indices [B] or one-hot [B, classes], "
            f"got {type(target).__name__}"
        )
    if target.dim() == 1:
        if target.is_floating_point() or target.shape[0] != batch:
            raise ValueError(
                f"target of class indices must be an integer tensor of shape [B] = ({batch},), "
                f"got dtype {target.dtype}, shape {tuple(target.shape)}"
            )
        if target.numel() and (target.min() < 0 or target.max() >= classes):
            raise ValueError(f"target class indices must be in [0, {classes - 1}]")
    elif tuple(target.shape) != (batch, classes):
        raise ValueError(
            f"target must be [B] class indices or a one-hot of the shape of lengths "
            f"{(batch, classes)}, got {tuple(target.shape)}"
        )
    return reference.margin_loss(lengths, target, m_pos, m_neg, lam)


def reconstruction_loss(reconstructions: Tensor, images: Tensor, scale: float = 0.0005) -> Tensor:
    """Sum of squared errors per image times ``scale`` (paper: 0.0005), averaged over the batch
    (0 for an empty batch).

    Both arguments are [B, ...] with the same number of values per sample.
    """
    for name, t in (("reconstructions", reconstructions), ("images", images)):
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise ValueError(f"{name} must be a tensor of shape [B, ...], got {t!r:.80}")
    if not reconstructions.is_floating_point():
        raise ValueError(
            f"reconstructions must be a floating-point tensor, got dtype {reconstructions.dtype}"
        )
    if reconstructions.shape[0] != images.shape[0] or math.prod(
        reconstructions.shape[1:]
    ) != math.prod(images.shape[1:]):
        raise ValueError(
            "reconstructions and images must hold the same batch size and values per sample, got "
            f"{tuple(reconstructions.shape)} and {tuple(images.shape)}"
        )
    return reference.reconstruction_loss(reconstructions, images.to(reconstructions.dtype), scale)
