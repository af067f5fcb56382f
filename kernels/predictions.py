"""Prediction vectors ``u_hat[b, i, j, :] = weight[i, j] @ u[b, i]`` and their gradients, on the
routing kernels' tiles (``fastcaps.kernels.routing``).

A program owns a block of BLOCK_B samples and a slice of consecutive input capsules. For each
capsule it forms the [BLOCK_B, parents x Dout] tile of all its samples as one matrix product on
``tl.dot``, ``U_i [BLOCK_B, Din] @ W_i^T [Din, Nout * Dout]`` (Din padded to the dot's minimum K
with zeros, float32 accumulation, bfloat16/float16 on the tensor cores), so the samples share one
read of the weight tile. The backward reads each tile of grad u_hat once and contracts it into
both gradients, ``grad u_i = G_i @ W_i`` and ``grad W_i += G_i^T @ U_i``. The parents are the
routing kernels' two power-of-two groups (Nout = 10 runs as 8 + 2) or, when there are too many
for the registers, chunks of JA parents, one chunk per program.

grad weight is reduced over the batch without atomics: the programs of a batch chunk walk its
sample blocks and accumulate into the chunk's slot of a ``[chunks, Nin, Nout, Dout, Din]``
buffer, which the host sums, so the result is deterministic. With chunked parents each chunk's
part of grad u goes to its own slot of ``[parent chunks, B, Nin, Din]``, likewise summed.
"""

import triton
import triton.language as tl

from fastcaps.kernels.routing import (
    _batch_chunk_program,
    _contract_group,
    _grad_weight_tiles,
    _group,
    _program_block,
    _sample_block,
    _u_hat_group,
)


@triton.jit
def predictions_forward_kernel(
    u_ptr,
    w_ptr,
    u_hat_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    capsules_per_slice,
    parent_chunks,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    JB: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Grid (slices * sample blocks * parent chunks,): writes the program's tiles of a contiguous
    u_hat [B, Nin, Nout, Dout] (u's dtype)."""
    HAS_B: tl.constexpr = JB > 0
    _slice_id, b, b_mask, first, last, j0 = _program_block(
        tl.program_id(0), batch, n_in, capsules_per_slice, parent_chunks, BLOCK_B, JA
    )
    row = tl.cast(n_out, tl.int64) * d_out  # one capsule's [Nout, Dout] in u_hat
    _state_a, mask_a, _parents_a, out_a, w_a, w_mask_a = _group(
        b, b_mask, j0, n_out, d_out, n_in * row, d_out, 1,
        stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
    )  # fmt: skip
    mask_b, out_b, w_b, w_mask_b = mask_a, out_a, w_a, w_mask_a
    if HAS_B:
        _state_b, mask_b, _parents_b, out_b, w_b, w_mask_b = _group(
            b, b_mask, JA, n_out, d_out, n_in * row, d_out, 1,
            stride_w_j, stride_w_d, stride_w_k, DIN, KP, JB, DP,
        )  # fmt: skip
    k = tl.arange(0, KP).to(tl.int64)
    u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
    u_mask = b_mask[:, None] & (k < DIN)[None, :]
    for capsule in range(first, last):
        capsule = tl.cast(capsule, tl.int64)
        U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
        capsule_w = w_ptr + capsule * stride_w_i
        out = u_hat_ptr + capsule * row
        tile_a, _ = _u_hat_group(U, out, out_a, mask_a, capsule_w, w_a, w_mask_a, True,
                                 PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
        tl.store(out + out_a, tile_a.to(u_hat_ptr.dtype.element_ty), mask=mask_a)
        if HAS_B:
            tile_b, _ = _u_hat_group(U, out, out_b, mask_b, capsule_w, w_b, w_mask_b, True,
                                     PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
            tl.store(out + out_b, tile_b.to(u_hat_ptr.dtype.element_ty), mask=mask_b)


@triton.jit
def _contract(g, W, U, NEED_U: tl.constexpr, NEED_W: tl.constexpr, SPLIT_K: tl.constexpr,
              PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):  # fmt: skip
    """grad u [BLOCK_B, KP] = g W_i and grad W_i^T [JG * DP, KP] = g^T U_i of one parent group
    (each zeros when not needed; both: the routing pairs kernel's contraction, SPLIT_K as
    there)."""
    if NEED_U and NEED_W:
        grad_u, grad_w = _contract_group(g, W, U, SPLIT_K, PRECISION, COMPUTE_DTYPE)
    else:
        g = g.to(W.dtype)
        grad_u = tl.zeros((g.shape[0], W.shape[0]), dtype=COMPUTE_DTYPE)
        grad_w = tl.zeros((g.shape[1], W.shape[0]), dtype=COMPUTE_DTYPE)
        if NEED_U:
            grad_u = tl.dot(g, tl.trans(W), input_precision=PRECISION, out_dtype=COMPUTE_DTYPE)
        if NEED_W:
            grad_w = tl.dot(tl.trans(g), U, input_precision=PRECISION, out_dtype=COMPUTE_DTYPE)
    return grad_u, grad_w


@triton.jit(do_not_specialize=["blocks_per_chunk"])
def predictions_backward_kernel(
    grad_ptr,
    u_ptr,
    w_ptr,
    grad_u_ptr,
    grad_w_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    capsules_per_slice,
    blocks_per_chunk,
    chunks,
    parent_chunks,
    stride_g_b,
    stride_g_i,
    stride_g_j,
    stride_g_d,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    NEED_U: tl.constexpr,
    NEED_W: tl.constexpr,
    CHUNKED: tl.constexpr,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    JB: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Grid (slices * batch chunks * parent chunks,): a program walks the sample blocks of its
    batch chunk and, for each, the capsules of its slice, reading grad u_hat [B, Nin, Nout, Dout]
    (any strides) once per tile. NEED_U: writes grad u (contiguous [B, Nin, Din], u's dtype;
    CHUNKED: the parent chunk's part, [parent chunks, B, Nin, Din] in COMPUTE_DTYPE). NEED_W:
    accumulates the batch chunk's grad W into its slot of grad_w (contiguous
    [chunks, Nin, Nout, Dout, Din], COMPUTE_DTYPE)."""
    HAS_B: tl.constexpr = JB > 0
    pid = tl.program_id(0)
    j0, _slice_id, chunk, first, last, first_block, last_block = _batch_chunk_program(
        pid, batch, n_in, capsules_per_slice, blocks_per_chunk, chunks, parent_chunks, BLOCK_B, JA
    )
    gw_a, gw_mask_a, gw_b, gw_mask_b, gw_chunk = _grad_weight_tiles(
        grad_w_ptr, chunk, j0, n_in, n_out, d_out, DIN, KP, JA, JB, DP
    )
    k = tl.arange(0, KP).to(tl.int64)
    for block in range(first_block, last_block):
        b, b_mask = _sample_block(block, batch, BLOCK_B)
        _state_a, mask_a, _parents_a, g_a_at, w_a, w_mask_a = _group(
            b, b_mask, j0, n_out, d_out, stride_g_b, stride_g_j, stride_g_d,
            stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
        )  # fmt: skip
        mask_b, g_b_at, w_b, w_mask_b = mask_a, g_a_at, w_a, w_mask_a
        if HAS_B:
            _state_b, mask_b, _parents_b, g_b_at, w_b, w_mask_b = _group(
                b, b_mask, JA, n_out, d_out, stride_g_b, stride_g_j, stride_g_d,
                stride_w_j, stride_w_d, stride_w_k, DIN, KP, JB, DP,
            )  # fmt: skip
        u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
        u_mask = b_mask[:, None] & (k < DIN)[None, :]
        for capsule in range(first, last):
            capsule = tl.cast(capsule, tl.int64)
            U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
            capsule_w = w_ptr + capsule * stride_w_i
            capsule_grad = grad_ptr + capsule * stride_g_i
            capsule_gw = gw_chunk + capsule * n_out * d_out * DIN
            g_a = tl.load(capsule_grad + g_a_at, mask=mask_a, other=0.0)
            W_a = tl.load(capsule_w + w_a, mask=w_mask_a, other=0.0)
            grad_u, grad_w_a = _contract(g_a, W_a, U, NEED_U, NEED_W, not CHUNKED, PRECISION,
                                         COMPUTE_DTYPE)  # fmt: skip
            if NEED_W:
                if block > first_block:
                    grad_w_a += tl.load(capsule_gw + gw_a, mask=gw_mask_a, other=0.0)
                tl.store(capsule_gw + gw_a, grad_w_a, mask=gw_mask_a)
            if HAS_B:
                g_b = tl.load(capsule_grad + g_b_at, mask=mask_b, other=0.0)
                W_b = tl.load(capsule_w + w_b, mask=w_mask_b, other=0.0)
                grad_u_b, grad_w_b = _contract(g_b, W_b, U, NEED_U, NEED_W, not CHUNKED,
                                               PRECISION, COMPUTE_DTYPE)  # fmt: skip
                grad_u += grad_u_b
                if NEED_W:
                    if block > first_block:
                        grad_w_b += tl.load(capsule_gw + gw_b, mask=gw_mask_b, other=0.0)
                    tl.store(capsule_gw + gw_b, grad_w_b, mask=gw_mask_b)
            if NEED_U:
                gu_offsets = (b[:, None] * n_in + capsule) * DIN + k[None, :]
                if CHUNKED:  # this parent chunk's part; the host sums the chunks
                    gu_offsets += tl.cast(pid % parent_chunks, tl.int64) * batch * n_in * DIN
                tl.store(grad_u_ptr + gu_offsets, grad_u.to(grad_u_ptr.dtype.element_ty),
                         mask=u_mask)  # fmt: skip
