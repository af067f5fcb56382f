"""The fused capsule layer's last backward pass: grad u and grad weight straight from the routing
state, recomputing u_hat tile by tile (the forward and the per-sample state pass are the routing
kernels with FROM_WEIGHT, see fastcaps.kernels.routing).

A program owns BLOCK_I input capsules and a chunk of samples. It loads its weight tile
[BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_K] once and keeps it in registers for every sample of the
chunk; per sample it rebuilds the u_hat tile, forms g_u_hat = sum_r c_r gs_r + ga_r V_r, and
contracts it at once into grad u (weight^T g_u_hat) and into its grad weight accumulator
(g_u_hat ⊗ u), which it writes once into its own chunk's slot of a [chunks, Nin, Nout, Dout,
Din] buffer. The host sums the chunks: deterministic, no atomics.
"""

import triton
import triton.language as tl

from fastcaps.kernels.predictions import pair_tile_offsets
from fastcaps.kernels.routing import routing_grad_pairs_tile


@triton.jit
def capsule_routing_backward_pairs_kernel(
    u_ptr,
    w_ptr,
    V_all_ptr,
    grad_s_all_ptr,
    grad_u_ptr,
    partial_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    d_in,
    iterations,
    samples_per_chunk,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DETACH_LOGITS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (Nin tiles, chunks). grad_u: contiguous [B, Nin, Din]; partial: contiguous
    [chunks, Nin, Nout, Dout, Din] in COMPUTE_DTYPE."""
    chunk = tl.program_id(1).to(tl.int64)
    i, j, d, mask = pair_tile_offsets(
        tl.program_id(0).to(tl.int64) * BLOCK_I, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D
    )
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = k < d_in
    mask4 = mask[:, :, :, None] & k_mask[None, None, None, :]
    w_offsets = (
        i[:, None, None, None] * stride_w_i
        + j[None, :, None, None] * stride_w_j
        + d[None, None, :, None] * stride_w_d
        + k[None, None, None, :] * stride_w_k
    )
    weight = tl.load(w_ptr + w_offsets, mask=mask4, other=0.0).to(COMPUTE_DTYPE)
    u_mask = (i < n_in)[:, None] & k_mask[None, :]
    grad_weight = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_K), dtype=COMPUTE_DTYPE)
    first = chunk * samples_per_chunk
    last = tl.minimum(first + samples_per_chunk, batch)
    for b in range(first, last):
        u_offsets = b * stride_u_b + i[:, None] * stride_u_i + k[None, :] * stride_u_k
        u = tl.load(u_ptr + u_offsets, mask=u_mask, other=0.0).to(COMPUTE_DTYPE)  # [BI, BK]
        u_hat = tl.sum(weight * u[:, None, None, :], axis=3)
        grad = routing_grad_pairs_tile(
            u_hat, V_all_ptr, grad_s_all_ptr, b, j, d, batch, n_out, d_out, iterations,
            DETACH_LOGITS, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
        )  # fmt: skip
        grad_u = tl.sum(tl.sum(grad[:, :, :, None] * weight, axis=2), axis=1)
        grad_u_offsets = (b * n_in + i[:, None]) * d_in + k[None, :]
        tl.store(grad_u_ptr + grad_u_offsets, grad_u.to(grad_u_ptr.dtype.element_ty), mask=u_mask)
        grad_weight += grad[:, :, :, None] * u[:, None, None, :]
    out_offsets = (
        chunk * n_in * n_out * d_out * d_in
        + i[:, None, None, None] * (n_out * d_out * d_in)
        + j[None, :, None, None] * (d_out * d_in)
        + d[None, None, :, None] * d_in
        + k[None, None, None, :]
    )
    tl.store(partial_ptr + out_offsets, grad_weight, mask=mask4)
