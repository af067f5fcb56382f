"""Dynamic routing (Sabour et al. 2017, Procedure 1): all iterations in one launch, and backward.

Notation per sample: u_hat [Nin, Nout, Dout]; iteration r has coefficients
``c_r = softmax_j(u_hat_ij . V_r,j)``, sums ``s_r = sum_i c_r,ij u_hat_ij (+ bias)`` and outputs
``v_r = squash(s_r)``, where ``V_r = v_0 + ... + v_(r-1)`` (so ``V_0 = 0`` and ``c_0 = 1/Nout``):
the logits are never stored. The forward kernel writes v and, per iteration, s_r and V_r
([R, B, Nout, Dout]: tiny) for backward.

Backward, walking r = R-1 .. 0, with ``go_r`` the gradient reaching v_r:
``gs_r = squash'(s_r) go_r``; ``gc_r,ij = u_hat_ij . gs_r,j``;
``ga_r = c_r (gc_r - sum_j c_r gc_r)`` (softmax over the parents);
``gV_r = sum_i ga_r,ij u_hat_ij``, which reaches every earlier output: ``go_t += gV_r`` for t < r.
Then ``g_u_hat_ij = sum_r (c_r,ij gs_r,j + ga_r,ij V_r,j)``. With DETACH_LOGITS only the last
weighted sum is differentiated: one r, no ga terms.

The state kernel needs reductions over all input capsules of a sample, so one program owns a
sample and walks its u_hat in [BLOCK_I, BLOCK_J, BLOCK_D] tiles, once per iteration. The pairs
kernel then forms g_u_hat tile by tile, independently per (tile, sample).

With FROM_WEIGHT the u_hat tiles are computed on the fly from u and weight
(``prediction_tile``), so the same kernels serve the fused layer, where u_hat is never stored.
"""

import triton
import triton.language as tl

from fastcaps.kernels.predictions import pair_tile_offsets, prediction_tile, tile_offsets
from fastcaps.kernels.squash import squash_rows, squash_rows_backward


@triton.jit
def _u_hat_tile(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    b,
    i,
    j,
    d,
    mask,
    n_in,
    stride_uh_b,
    stride_uh_i,
    stride_uh_j,
    stride_uh_d,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if FROM_WEIGHT:
        tile = prediction_tile(
            u_ptr, w_ptr, b, i, j, d, mask, stride_u_b, stride_u_i, stride_u_k,
            stride_w_i, stride_w_j, stride_w_d, stride_w_k, n_in,
            DIN, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
        )  # fmt: skip
    else:
        offsets = b * stride_uh_b + tile_offsets(i, j, d, stride_uh_i, stride_uh_j, stride_uh_d)
        tile = tl.load(u_hat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    return tile


@triton.jit
def _coefficients(tile, V, j, n_out):
    """c [BLOCK_I, BLOCK_J]: softmax over the valid parents of ``tile . V``."""
    logits = tl.sum(tile * V[None, :, :], axis=2)
    logits = tl.where((j < n_out)[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _logit_gradient(tile, c, grad_s):
    """ga [BLOCK_I, BLOCK_J]: the softmax backward of ``gc = tile . grad_s``."""
    grad_c = tl.sum(tile * grad_s[None, :, :], axis=2)
    return c * (grad_c - tl.sum(c * grad_c, axis=1)[:, None])


@triton.jit
def _state_offsets(j, d, d_out):
    """Offsets of a [BLOCK_J, BLOCK_D] capsule block in a contiguous [..., Nout, Dout] tensor."""
    return j[:, None] * d_out + d[None, :]


@triton.jit
def routing_forward_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    bias_ptr,
    v_ptr,
    s_all_ptr,
    V_all_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    iterations,
    eps,
    stride_uh_b,
    stride_uh_i,
    stride_uh_j,
    stride_uh_d,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    stride_bias_j,
    stride_bias_d,
    HAS_BIAS: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B,): all iterations for one sample. Writes v [B, Nout, Dout] (input dtype) and
    s_all, V_all [R, B, Nout, Dout] (COMPUTE_DTYPE), all contiguous."""
    b = tl.program_id(0).to(tl.int64)
    _, j, d, _ = pair_tile_offsets(0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
    capsule_mask = (j < n_out)[:, None] & (d < d_out)[None, :]
    state = _state_offsets(j, d, d_out)
    bias = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
    if HAS_BIAS:
        bias_offsets = j[:, None] * stride_bias_j + d[None, :] * stride_bias_d
        bias = tl.load(bias_ptr + bias_offsets, mask=capsule_mask, other=0.0).to(COMPUTE_DTYPE)
    V = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
    v = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
    sample_state = b * n_out * d_out + state
    for r in range(iterations):
        s = bias
        for i0 in range(0, n_in, BLOCK_I):
            i, j, d, mask = pair_tile_offsets(i0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
            tile = _u_hat_tile(
                u_hat_ptr, u_ptr, w_ptr, b, i, j, d, mask, n_in,
                stride_uh_b, stride_uh_i, stride_uh_j, stride_uh_d, stride_u_b, stride_u_i,
                stride_u_k, stride_w_i, stride_w_j, stride_w_d, stride_w_k,
                FROM_WEIGHT, DIN, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
            )  # fmt: skip
            c = _coefficients(tile, V, j, n_out)
            s += tl.sum(c[:, :, None] * tile, axis=0)
        offset = r * batch * n_out * d_out + sample_state
        tl.store(s_all_ptr + offset, s, mask=capsule_mask)
        tl.store(V_all_ptr + offset, V, mask=capsule_mask)
        v = squash_rows(s, eps)
        V += v
    tl.store(v_ptr + sample_state, v.to(v_ptr.dtype.element_ty), mask=capsule_mask)


@triton.jit
def routing_backward_state_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    s_all_ptr,
    V_all_ptr,
    grad_v_ptr,
    grad_s_all_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    iterations,
    eps,
    stride_uh_b,
    stride_uh_i,
    stride_uh_j,
    stride_uh_d,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    stride_gv_b,
    stride_gv_j,
    stride_gv_d,
    DETACH_LOGITS: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B,): gs_r for every iteration of one sample into grad_s_all [R, B, Nout, Dout]
    (COMPUTE_DTYPE, contiguous; with DETACH_LOGITS only r = R-1 is written, the caller zeroes
    the rest)."""
    b = tl.program_id(0).to(tl.int64)
    _, j, d, _ = pair_tile_offsets(0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
    capsule_mask = (j < n_out)[:, None] & (d < d_out)[None, :]
    sample_state = b * n_out * d_out + _state_offsets(j, d, d_out)
    gv_offsets = b * stride_gv_b + j[:, None] * stride_gv_j + d[None, :] * stride_gv_d
    grad_v = tl.load(grad_v_ptr + gv_offsets, mask=capsule_mask, other=0.0).to(COMPUTE_DTYPE)
    grad_later = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)  # sum of gV_r' for r' > r
    steps = iterations
    if DETACH_LOGITS:
        steps = 1
    for step in range(steps):
        r = iterations - 1 - step
        offset = r * batch * n_out * d_out + sample_state
        s = tl.load(s_all_ptr + offset, mask=capsule_mask, other=0.0)
        grad_out = grad_later + grad_v
        grad_s = squash_rows_backward(s, grad_out, eps)
        tl.store(grad_s_all_ptr + offset, grad_s, mask=capsule_mask)
        if r > 0:  # iteration 0 has constant (zero) logits
            V = tl.load(V_all_ptr + offset, mask=capsule_mask, other=0.0)
            grad_V = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
            for i0 in range(0, n_in, BLOCK_I):
                i, j, d, mask = pair_tile_offsets(i0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
                tile = _u_hat_tile(
                    u_hat_ptr, u_ptr, w_ptr, b, i, j, d, mask, n_in,
                    stride_uh_b, stride_uh_i, stride_uh_j, stride_uh_d, stride_u_b, stride_u_i,
                    stride_u_k, stride_w_i, stride_w_j, stride_w_d, stride_w_k,
                    FROM_WEIGHT, DIN, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
                )  # fmt: skip
                c = _coefficients(tile, V, j, n_out)
                grad_logits = _logit_gradient(tile, c, grad_s)
                grad_V += tl.sum(grad_logits[:, :, None] * tile, axis=0)
            grad_later += grad_V
        grad_v = tl.zeros((BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)  # gv reaches only v_(R-1)


@triton.jit
def routing_grad_pairs_tile(
    tile,
    V_all_ptr,
    grad_s_all_ptr,
    b,
    j,
    d,
    batch,
    n_out,
    d_out,
    iterations,
    DETACH_LOGITS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """g_u_hat for one u_hat tile of sample b: ``sum_r c_r gs_r + ga_r V_r``."""
    capsule_mask = (j < n_out)[:, None] & (d < d_out)[None, :]
    sample_state = b * n_out * d_out + _state_offsets(j, d, d_out)
    grad = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
    steps = iterations
    if DETACH_LOGITS:
        steps = 1
    for step in range(steps):
        r = iterations - 1 - step
        offset = r * batch * n_out * d_out + sample_state
        V = tl.load(V_all_ptr + offset, mask=capsule_mask, other=0.0)
        grad_s = tl.load(grad_s_all_ptr + offset, mask=capsule_mask, other=0.0)
        c = _coefficients(tile, V, j, n_out)
        grad += c[:, :, None] * grad_s[None, :, :]
        if not DETACH_LOGITS:
            grad_logits = _logit_gradient(tile, c, grad_s)  # zero for r = 0, where V_0 = 0
            grad += grad_logits[:, :, None] * V[None, :, :]
    return grad


@triton.jit
def routing_backward_pairs_kernel(
    u_hat_ptr,
    V_all_ptr,
    grad_s_all_ptr,
    grad_u_hat_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    iterations,
    stride_uh_b,
    stride_uh_i,
    stride_uh_j,
    stride_uh_d,
    DETACH_LOGITS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (Nin tiles, B): grad u_hat into a contiguous [B, Nin, Nout, Dout]."""
    b = tl.program_id(1).to(tl.int64)
    i, j, d, mask = pair_tile_offsets(
        tl.program_id(0).to(tl.int64) * BLOCK_I, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D
    )
    offsets = b * stride_uh_b + tile_offsets(i, j, d, stride_uh_i, stride_uh_j, stride_uh_d)
    tile = tl.load(u_hat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    grad = routing_grad_pairs_tile(
        tile, V_all_ptr, grad_s_all_ptr, b, j, d, batch, n_out, d_out, iterations,
        DETACH_LOGITS, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
    )  # fmt: skip
    out = grad_u_hat_ptr + b * n_in * n_out * d_out + tile_offsets(i, j, d, n_out * d_out, d_out, 1)
    tl.store(out, grad.to(grad_u_hat_ptr.dtype.element_ty), mask=mask)
