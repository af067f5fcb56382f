"""Dynamic routing (Sabour et al. 2017, Procedure 1) as Triton kernels tiled for the GPU.

Notation per sample: u_hat [Nin, Nout, Dout]; iteration r has coefficients
``c_r = softmax_j(u_hat_ij . V_r,j)``, sums ``s_r = sum_i c_r,ij u_hat_ij (+ bias)`` and outputs
``v_r = squash(s_r)``, where ``V_r = v_0 + ... + v_(r-1)`` (``V_0 = 0``, so ``c_0 = 1/Nout``):
the logits are never stored, only s_r and V_r ([R, B, Nout, Dout]).

Tiling. A program owns a block of BLOCK_B samples and a slice of consecutive input capsules. For
each capsule of its slice it forms the u_hat tile of all its samples at once, either by loading
it (a stored u_hat) or, with FROM_WEIGHT, as one matrix product on ``tl.dot``:
``U_i [BLOCK_B, Din] @ W_i^T [Din, Nout * Dout]`` (Din padded to the dot's minimum K with zeros,
float32 accumulation; ``PRECISION`` chooses the float32 dot: "ieee" by default). The first
forward pass (r = 0), a plain sum of u_hat, stacks STACKED capsules into each dot's K instead
(``[U_i1 .. U_iS] @ [W_i1^T; ..; W_iS^T]``) where Din is below the dot's minimum K. The parents are
split into two power-of-two groups, A (the largest power of two <= Nout) and B (the rest,
rounded up; absent when Nout is a power of two), so Nout = 10 runs as 8 + 2 parents with nothing
padded. The per-parent work (agreement, softmax over the parents, weighted sums) runs on the
[BLOCK_B, parents, Dout] tiles in registers.

Reductions over the input capsules (s_r in forward, gV_r in backward) are split across slices:
every program writes its slice's partial sum into ``partial [slices, B, Nout, Dout]`` and a
combine kernel adds the slices in a fixed order (deterministic, no atomics), then applies bias
and squash (forward) or the squash backward (backward). So a forward is 2 launches per
iteration, and the grid is slices x sample blocks whatever the batch size.

Backward, walking r = R-1 .. 1 (``go_r`` is the gradient reaching v_r, ``gs_r = squash'(s_r)
go_r``): ``gc_r,ij = u_hat_ij . gs_r,j``, ``ga_r = c_r (gc_r - sum_j c_r gc_r)``,
``gV_r = sum_i ga_r,ij u_hat_ij``, and ``go_t = gV_(t+1) + ... + gV_(R-1)`` for t < R-1
(``go_(R-1)`` is grad v). The pairs kernel then forms
``g_u_hat_ij = sum_r c_r,ij gs_r,j + ga_r,ij V_r,j`` per tile and stores it (stored u_hat) or
contracts it at once, again on ``tl.dot``, into ``grad u_i = g_u_hat_i @ W_i`` and
``grad W_i += g_u_hat_i^T @ U_i`` (FROM_WEIGHT; Din is only an N of these dots, padded to 8, not
to the minimum K, unless the kernel recomputes u_hat). With LAST_ONLY (detach_logits, or a single
iteration) only the last weighted sum is differentiated.

All offsets are int64; all arithmetic is in COMPUTE_DTYPE (float32, or float64 for float64).
"""

import triton
import triton.language as tl

from fastcaps.kernels.squash import div_rn, sqrt_rn, squash_rows, squash_rows_backward


@triton.jit
def _sample_block(sample_block, batch, BLOCK_B: tl.constexpr):
    """Sample indices [BLOCK_B] (int64) of a block and their mask."""
    b = tl.cast(sample_block, tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    return b, b < batch


@triton.jit
def _program_block(pid, batch, n_in, capsules_per_slice, parent_chunks, BLOCK_B: tl.constexpr,
                   JA: tl.constexpr):  # fmt: skip
    """The work of a partial-sum program, grid (slices * sample blocks * parent chunks,) with
    parent chunks fastest: its slice, samples [BLOCK_B] (int64) and their mask, its capsules
    [first, last) and its first parent (0 unless the parents are chunked, JA per chunk)."""
    chunk = pid % parent_chunks
    rest = pid // parent_chunks
    sample_blocks = tl.cdiv(batch, BLOCK_B)
    slice_id = rest // sample_blocks
    b, b_mask = _sample_block(rest % sample_blocks, batch, BLOCK_B)
    first = slice_id * capsules_per_slice
    return slice_id, b, b_mask, first, tl.minimum(first + capsules_per_slice, n_in), chunk * JA


@triton.jit
def _chunk_coefficients(tile, X, parents, stats_ptr, stats_at, b_mask, BLOCK_B: tl.constexpr,
                        JG: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """Coefficients of one chunk of parents from the log-sum-exp of all logits of each sample,
    ``lse[b]`` at ``stats_ptr + stats_at`` ([BLOCK_B] offsets): ``c = exp(u_hat . X - lse)``."""
    lse = tl.load(stats_ptr + stats_at, mask=b_mask, other=0.0)
    return tl.exp(_agreement(tile, X, parents, BLOCK_B, JG, DP) - lse[:, None])


@triton.jit
def _group_columns(j0, n_out, d_out, JG: tl.constexpr, DP: tl.constexpr):
    """The [JG * DP] columns of the parent group j0 .. j0+JG-1 (column n: parent j0 + n // DP,
    dim n % DP): their parents, dims and mask of the valid ones."""
    n = tl.arange(0, JG * DP)
    j = j0 + (n // DP).to(tl.int64)
    d = (n % DP).to(tl.int64)
    return j, d, (j < n_out) & (d < d_out)


@triton.jit
def _group(
    b,
    b_mask,
    j0,
    n_out,
    d_out,
    stride_uh_b,
    stride_uh_j,
    stride_uh_d,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JG: tl.constexpr,
    DP: tl.constexpr,
):
    """Offsets of the parent group j0 .. j0+JG-1 as [BLOCK_B, JG * DP] tiles (column n is parent
    j0 + n // DP, dim n % DP): in a contiguous [B, Nout, Dout] state tensor, with its mask; the
    [JG] mask of the valid parents; in u_hat without the capsule term; and in the weight as the
    tile W_i^T [KP, JG * DP] without the capsule term, with its mask."""
    j, d, columns = _group_columns(j0, n_out, d_out, JG, DP)
    state = b[:, None] * (n_out * d_out) + (j * d_out + d)[None, :]
    state_mask = b_mask[:, None] & columns[None, :]
    parents = (j0 + tl.arange(0, JG)) < n_out
    uh_offsets = b[:, None] * stride_uh_b + (j * stride_uh_j + d * stride_uh_d)[None, :]
    k = tl.arange(0, KP).to(tl.int64)
    w_offsets = k[:, None] * stride_w_k + (j * stride_w_j + d * stride_w_d)[None, :]
    w_mask = (k < DIN)[:, None] & columns[None, :]
    return state, state_mask, parents, uh_offsets, w_offsets, w_mask


@triton.jit
def _u_hat_group(
    U,
    capsule_u_hat_ptr,
    uh_offsets,
    state_mask,
    capsule_w_ptr,
    w_offsets,
    w_mask,
    FROM_WEIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The u_hat tile [BLOCK_B, JG * DP] of one capsule and parent group, and (FROM_WEIGHT) the
    weight tile W_i^T [KP, JG * DP] it was computed from. The dot's operands are cast to
    DOT_DTYPE (a no-op unless a kernel computes half inputs in float32 to save registers)."""
    if FROM_WEIGHT:
        W = tl.load(capsule_w_ptr + w_offsets, mask=w_mask, other=0.0)
        tile = tl.dot(U.to(DOT_DTYPE), W.to(DOT_DTYPE), input_precision=PRECISION,
                      out_dtype=COMPUTE_DTYPE)  # fmt: skip
    else:
        W = U  # unused
        tile = tl.load(capsule_u_hat_ptr + uh_offsets, mask=state_mask, other=0.0)
        tile = tile.to(COMPUTE_DTYPE)
    return tile, W


@triton.jit
def _parent_sum(x, parents, BLOCK_B: tl.constexpr, JG: tl.constexpr, DP: tl.constexpr):
    """[BLOCK_B, JG]: the sum over each parent's DP columns of x [BLOCK_B, JG * DP]."""
    return tl.sum(tl.reshape(x, (BLOCK_B, JG, DP)), axis=2)


@triton.jit
def _spread(c, BLOCK_B: tl.constexpr, JG: tl.constexpr, DP: tl.constexpr):
    """[BLOCK_B, JG * DP]: every parent's value of c [BLOCK_B, JG] repeated over its columns."""
    return tl.reshape(tl.broadcast_to(c[:, :, None], (BLOCK_B, JG, DP)), (BLOCK_B, JG * DP))


@triton.jit
def _agreement(tile, X, parents, BLOCK_B: tl.constexpr, JG: tl.constexpr, DP: tl.constexpr):
    """[BLOCK_B, JG]: u_hat_ij . X_j, with -inf for the padded parents."""
    logits = _parent_sum(tile * X, parents, BLOCK_B, JG, DP)
    return tl.where(parents[None, :], logits, float("-inf"))


@triton.jit
def _softmax_parents(logits_a, logits_b, HAS_B: tl.constexpr):
    """Coefficients of both parent groups: one softmax over all valid parents of each sample."""
    m = tl.max(logits_a, axis=1)
    if HAS_B:
        m = tl.maximum(m, tl.max(logits_b, axis=1))
    e_a = tl.exp(logits_a - m[:, None])
    total = tl.sum(e_a, axis=1)
    e_b = e_a
    if HAS_B:
        e_b = tl.exp(logits_b - m[:, None])
        total += tl.sum(e_b, axis=1)
    inv = div_rn(tl.full(total.shape, 1.0, total.dtype), total)
    return e_a * inv[:, None], e_b * inv[:, None]


@triton.jit
def _softmax_parents_backward(c_a, c_b, grad_c_a, grad_c_b, HAS_B: tl.constexpr):
    """Gradient of the logits of both groups, given the coefficients and their gradients."""
    inner = tl.sum(c_a * grad_c_a, axis=1)
    if HAS_B:
        inner += tl.sum(c_b * grad_c_b, axis=1)
    return c_a * (grad_c_a - inner[:, None]), c_b * (grad_c_b - inner[:, None])


@triton.jit
def _coefficient_offsets(b, b_mask, slot, batch, n_in, n_out, j0, JA: tl.constexpr,
                         JBG: tl.constexpr):  # fmt: skip
    """Offsets into a contiguous [R-1, B, Nin, Nout] coefficient buffer: the [BLOCK_B, 1] part of
    the slot and samples (add ``capsule * Nout`` and a parent index), the parent indices of both
    groups (group A from j0) and the [BLOCK_B, JG] masks of the valid ones."""
    rows = (tl.cast(slot, tl.int64) * batch + b) * n_in * n_out
    parent_a = j0 + tl.arange(0, JA)
    parent_b = JA + tl.arange(0, JBG)
    mask_a = b_mask[:, None] & (parent_a < n_out)[None, :]
    mask_b = b_mask[:, None] & (parent_b < n_out)[None, :]
    return rows[:, None], parent_a, mask_a, parent_b, mask_b


@triton.jit
def _squash_backward_tile(s, grad_v, eps, EXP: tl.constexpr, BLOCK_B: tl.constexpr,
                          JG: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """squash (EXP: exp_squash) backward on every parent's DP columns of [BLOCK_B, JG * DP]
    tiles."""
    rows = squash_rows_backward(
        tl.reshape(s, (BLOCK_B * JG, DP)), tl.reshape(grad_v, (BLOCK_B * JG, DP)), eps, EXP
    )
    return tl.reshape(rows, (BLOCK_B, JG * DP))


@triton.jit
def _prior_row(prior_ptr, capsule, parent, n_out, stride_p_i, stride_p_j,
               COMPUTE_DTYPE: tl.constexpr):  # fmt: skip
    """Self-attention routing's prior of one capsule for the parents ``parent`` [JG] (0 past
    Nout); it is added to the coefficients after the softmax."""
    at = capsule * stride_p_i + parent.to(tl.int64) * stride_p_j
    return tl.load(prior_ptr + at, mask=parent < n_out, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def _add_prior(c_a, c_b, prior_ptr, capsule, parent_a, parent_b, n_out, stride_p_i, stride_p_j,
               HAS_B: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):  # fmt: skip
    """Coefficients plus the prior (self-attention routing): c_a [..., JA] of the parents
    parent_a, and with HAS_B c_b [..., JBG] of parent_b; c_b unchanged without HAS_B."""
    c_a += _prior_row(prior_ptr, capsule, parent_a, n_out, stride_p_i, stride_p_j, COMPUTE_DTYPE)
    if HAS_B:
        c_b += _prior_row(prior_ptr, capsule, parent_b, n_out, stride_p_i, stride_p_j,
                          COMPUTE_DTYPE)  # fmt: skip
    return c_a, c_b


@triton.jit
def _over_sqrt(x, d_out):
    """x / sqrt(Dout), correctly rounded (self-attention routing's scale)."""
    return div_rn(x, sqrt_rn(tl.zeros_like(x) + d_out))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _stacked_dot(acc, U, w_ptr, capsule, rows_mask, kk, j0, n_out, d_out, stride_w_i,
                 stride_w_j, stride_w_d, stride_w_k, JG: tl.constexpr, DP: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    """acc [BLOCK_B, JG * DP] + U @ the stacked weight tile [W_i1^T; ..; W_iS^T] of a parent
    group (row m: capsule[m], input dim kk[m]; masked by rows_mask)."""
    j, d, columns = _group_columns(j0, n_out, d_out, JG, DP)
    rows = capsule * stride_w_i + kk * stride_w_k
    W = tl.load(w_ptr + rows[:, None] + (j * stride_w_j + d * stride_w_d)[None, :],
                mask=rows_mask[:, None] & columns[None, :], other=0.0)  # fmt: skip
    return tl.dot(U.to(DOT_DTYPE), W.to(DOT_DTYPE), acc, input_precision=PRECISION,
                  out_dtype=acc.dtype)  # fmt: skip


@triton.jit
def _stacked_sum(sum_a, sum_b, u_ptr, w_ptr, b, b_mask, j0, first, last, n_out, d_out,
                 stride_u_b, stride_u_i, stride_u_k, stride_w_i, stride_w_j, stride_w_d,
                 stride_w_k, DIN: tl.constexpr, STACKED: tl.constexpr, HAS_B: tl.constexpr,
                 JA: tl.constexpr, JB: tl.constexpr, DP: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    """The sum over the capsules [first, last) of u_hat (both parent groups), STACKED capsules
    per dot: ``[U_i1 .. U_iS] [BLOCK_B, S * DINP] @ [W_i1^T; ..; W_iS^T] [S * DINP, JG * DP]``,
    so that a Din below the dot's minimum K fills it with capsules instead of zeros."""
    DINP: tl.constexpr = triton.next_power_of_2(DIN)
    m = tl.arange(0, STACKED * DINP)
    c = (m // DINP).to(tl.int64)
    kk = (m % DINP).to(tl.int64)
    for c0 in range(first, last, STACKED):
        capsule = c0 + c
        rows_mask = (capsule < last) & (kk < DIN)
        U = tl.load(u_ptr + b[:, None] * stride_u_b + (capsule * stride_u_i
                                                       + kk * stride_u_k)[None, :],
                    mask=b_mask[:, None] & rows_mask[None, :], other=0.0)  # fmt: skip
        sum_a = _stacked_dot(sum_a, U, w_ptr, capsule, rows_mask, kk, j0, n_out, d_out,
                             stride_w_i, stride_w_j, stride_w_d, stride_w_k, JA, DP, PRECISION,
                             DOT_DTYPE)  # fmt: skip
        if HAS_B:
            sum_b = _stacked_dot(sum_b, U, w_ptr, capsule, rows_mask, kk, JA, n_out, d_out,
                                 stride_w_i, stride_w_j, stride_w_d, stride_w_k, JB, DP,
                                 PRECISION, DOT_DTYPE)  # fmt: skip
    return sum_a, sum_b


@triton.jit
def routing_forward_partial_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    V_all_ptr,
    stats_ptr,
    prior_ptr,
    partial_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    capsules_per_slice,
    parent_chunks,
    r,
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
    stride_p_i,
    stride_p_j,
    UNIFORM: tl.constexpr,
    CHUNKED: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    JB: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STACKED: tl.constexpr,
):
    """Grid (slices * sample blocks * parent chunks,): ``partial[slice, b] = sum over the slice of
    c_r u_hat`` into a contiguous [slices, B, Nout, Dout] (COMPUTE_DTYPE). UNIFORM (r = 0): the
    plain sum of u_hat (c = 1/Nout is applied by the combine kernel), V unread. CHUNKED: a
    program owns JA parents from ``chunk * JA`` and reads each sample's log-sum-exp of the logits
    from stats ([B, Nin], ``routing_softmax_stats_kernel``); else it owns all parents.
    HAS_PRIOR (self-attention routing): c_r = softmax + prior ([Nin, Nout]). STACKED > 1
    (UNIFORM with FROM_WEIGHT): the sum's dots take that many capsules each."""
    HAS_B: tl.constexpr = JB > 0
    JBG: tl.constexpr = JB if HAS_B else JA
    slice_id, b, b_mask, first, last, j0 = _program_block(
        tl.program_id(0), batch, n_in, capsules_per_slice, parent_chunks, BLOCK_B, JA
    )
    state_a, mask_a, parents_a, uh_a, w_a, w_mask_a = _group(
        b, b_mask, j0, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
        stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
    )  # fmt: skip
    state_b, mask_b, parents_b = state_a, mask_a, parents_a
    uh_b, w_b, w_mask_b = uh_a, w_a, w_mask_a
    if HAS_B:
        state_b, mask_b, parents_b, uh_b, w_b, w_mask_b = _group(
            b, b_mask, JA, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
            stride_w_j, stride_w_d, stride_w_k, DIN, KP, JB, DP,
        )  # fmt: skip
    k = tl.arange(0, KP).to(tl.int64)
    u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
    u_mask = b_mask[:, None] & (k < DIN)[None, :]
    V_offset = tl.cast(r, tl.int64) * batch * n_out * d_out
    if UNIFORM:
        V_a = tl.zeros((BLOCK_B, JA * DP), dtype=COMPUTE_DTYPE)
        V_b = V_a
    else:
        V_a = tl.load(V_all_ptr + V_offset + state_a, mask=mask_a, other=0.0)
        V_b = V_a
        if HAS_B:
            V_b = tl.load(V_all_ptr + V_offset + state_b, mask=mask_b, other=0.0)
    sum_a = tl.zeros((BLOCK_B, JA * DP), dtype=COMPUTE_DTYPE)
    sum_b = tl.zeros((BLOCK_B, JBG * DP), dtype=COMPUTE_DTYPE)
    if UNIFORM and FROM_WEIGHT and STACKED > 1:
        sum_a, sum_b = _stacked_sum(sum_a, sum_b, u_ptr, w_ptr, b, b_mask, j0, first, last,
                                    n_out, d_out, stride_u_b, stride_u_i, stride_u_k,
                                    stride_w_i, stride_w_j, stride_w_d, stride_w_k, DIN,
                                    STACKED, HAS_B, JA, JB, DP, PRECISION,
                                    DOT_DTYPE)  # fmt: skip
        capsules = 0  # the loop below has nothing left to do
    else:
        capsules = last - first
    for capsule in range(first, first + capsules):
        capsule = tl.cast(capsule, tl.int64)
        U = u_offsets  # unused without FROM_WEIGHT
        if FROM_WEIGHT:
            U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
        capsule_u_hat = u_hat_ptr + capsule * stride_uh_i
        capsule_w = w_ptr + capsule * stride_w_i
        tile_a, _ = _u_hat_group(U, capsule_u_hat, uh_a, mask_a, capsule_w, w_a, w_mask_a,
                                 FROM_WEIGHT, PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
        tile_b = tile_a
        if HAS_B:
            tile_b, _ = _u_hat_group(U, capsule_u_hat, uh_b, mask_b, capsule_w, w_b, w_mask_b,
                                     FROM_WEIGHT, PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
        if UNIFORM:
            sum_a += tile_a
            if HAS_B:
                sum_b += tile_b
        elif CHUNKED:
            c_a = _chunk_coefficients(tile_a, V_a, parents_a, stats_ptr, b * n_in + capsule,
                                      b_mask, BLOCK_B, JA, DP)  # fmt: skip
            if HAS_PRIOR:
                c_a, _ = _add_prior(c_a, c_a, prior_ptr, capsule, j0 + tl.arange(0, JA),
                                    None, n_out, stride_p_i, stride_p_j, False,
                                    COMPUTE_DTYPE)  # fmt: skip
            sum_a += _spread(c_a, BLOCK_B, JA, DP) * tile_a
        else:
            c_a, c_b = _softmax_parents(
                _agreement(tile_a, V_a, parents_a, BLOCK_B, JA, DP),
                _agreement(tile_b, V_b, parents_b, BLOCK_B, JBG, DP),
                HAS_B,
            )
            if HAS_PRIOR:
                c_a, c_b = _add_prior(c_a, c_b, prior_ptr, capsule, j0 + tl.arange(0, JA),
                                      JA + tl.arange(0, JBG), n_out, stride_p_i, stride_p_j,
                                      HAS_B, COMPUTE_DTYPE)  # fmt: skip
            sum_a += _spread(c_a, BLOCK_B, JA, DP) * tile_a
            if HAS_B:
                sum_b += _spread(c_b, BLOCK_B, JB, DP) * tile_b
    out = partial_ptr + tl.cast(slice_id, tl.int64) * batch * n_out * d_out
    tl.store(out + state_a, sum_a, mask=mask_a)
    if HAS_B:
        tl.store(out + state_b, sum_b, mask=mask_b)


@triton.jit
def routing_softmax_stats_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    V_all_ptr,
    grad_s_all_ptr,
    lse_ptr,
    inner_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    capsules_per_slice,
    parent_chunks,
    r,
    slot,
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
    WITH_GRAD: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Grid (slices * sample blocks,), when the parents are too many for one tile and are walked
    in chunks of JA: for every sample b and capsule i of the program,
    ``lse = log sum_j exp(u_hat_ij . V_r,j)`` into lse[slot, b, i] and, with WITH_GRAD,
    ``sum_j c_r,ij (u_hat_ij . gs_r,j)`` (the softmax backward's inner product) into
    inner[slot, b, i] (both contiguous [slots, B, Nin], COMPUTE_DTYPE). One pass over the chunks:
    the running sums are rescaled whenever the running maximum grows."""
    _slice_id, b, b_mask, first, last, j0 = _program_block(
        tl.program_id(0), batch, n_in, capsules_per_slice, 1, BLOCK_B, JA
    )
    k = tl.arange(0, KP).to(tl.int64)
    u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
    u_mask = b_mask[:, None] & (k < DIN)[None, :]
    state_offset = tl.cast(r, tl.int64) * batch * n_out * d_out
    out_rows = (tl.cast(slot, tl.int64) * batch + b) * n_in
    for capsule in range(first, last):
        capsule = tl.cast(capsule, tl.int64)
        U = u_offsets  # unused without FROM_WEIGHT
        if FROM_WEIGHT:
            U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
        capsule_u_hat = u_hat_ptr + capsule * stride_uh_i
        capsule_w = w_ptr + capsule * stride_w_i
        running_max = tl.full((BLOCK_B,), float("-inf"), dtype=COMPUTE_DTYPE)
        total = tl.zeros((BLOCK_B,), dtype=COMPUTE_DTYPE)
        inner = tl.zeros((BLOCK_B,), dtype=COMPUTE_DTYPE)
        for chunk in range(parent_chunks):
            state, mask, parents, uh, w, w_mask = _group(
                b, b_mask, j0 + chunk * JA, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
                stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
            )  # fmt: skip
            tile, _weight = _u_hat_group(U, capsule_u_hat, uh, mask, capsule_w, w, w_mask,
                                         FROM_WEIGHT, PRECISION, DOT_DTYPE,
                                         COMPUTE_DTYPE)  # fmt: skip
            V = tl.load(V_all_ptr + state_offset + state, mask=mask, other=0.0)
            logits = _agreement(tile, V, parents, BLOCK_B, JA, DP)
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(logits - new_max[:, None])
            total = total * rescale + tl.sum(e, axis=1)
            if WITH_GRAD:
                gs = tl.load(grad_s_all_ptr + state_offset + state, mask=mask, other=0.0)
                grad_c = _parent_sum(tile * gs, parents, BLOCK_B, JA, DP)
                inner = inner * rescale + tl.sum(e * grad_c, axis=1)
            running_max = new_max
        tl.store(lse_ptr + out_rows + capsule, running_max + tl.log(total), mask=b_mask)
        if WITH_GRAD:
            tl.store(inner_ptr + out_rows + capsule, div_rn(inner, total), mask=b_mask)


@triton.jit
def _capsule_rows(pid, batch, n_out, d_out, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of output capsules (rows b * Nout + j) of a [B, Nout, Dout] tensor: offsets
    [BLOCK_ROWS, BLOCK_D] (int64), their mask, and each row's parent index."""
    rows = tl.cast(pid, tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (rows < batch * n_out)[:, None] & (d < d_out)[None, :]
    return rows[:, None] * d_out + d[None, :], mask, rows % n_out


@triton.jit
def _sum_slices(partial_ptr, offsets, mask, slices, size, COMPUTE_DTYPE: tl.constexpr):
    """The sum over the slices of a [slices, ...] buffer, in slice order."""
    total = tl.load(partial_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    for slice_id in range(1, slices):
        at = tl.cast(slice_id, tl.int64) * size + offsets
        part = tl.load(partial_ptr + at, mask=mask, other=0.0)
        total += part.to(COMPUTE_DTYPE)
    return total


@triton.jit
def routing_forward_combine_kernel(
    partial_ptr,
    bias_ptr,
    s_all_ptr,
    V_all_ptr,
    v_ptr,
    batch,
    n_out,
    d_out,
    slices,
    r,
    iterations,
    eps: tl.float64,
    stride_bias_j,
    stride_bias_d,
    HAS_BIAS: tl.constexpr,
    ATTENTION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (capsule blocks,): ``s_r = sum of the slices (+ bias)``, ``v_r = squash(s_r)``. Writes
    s_all[r], V_all[r + 1] = V_r + v_r (V_all[0] = 0 when r = 0), and v (output dtype) after the
    last iteration. s_all, V_all: contiguous [R, B, Nout, Dout] in COMPUTE_DTYPE.
    ATTENTION (self-attention routing, R = 2): r = 0 writes the totals T = s_0 (no 1/Nout) and
    V_all[1] = T / sqrt(Dout), the vector every agreement is taken with; r = 1 writes
    v = exp_squash(s_1)."""
    pid = tl.program_id(0)
    offsets, mask, parent = _capsule_rows(pid, batch, n_out, d_out, BLOCK_ROWS, BLOCK_D)
    size = tl.cast(batch, tl.int64) * n_out * d_out
    s = _sum_slices(partial_ptr, offsets, mask, slices, size, COMPUTE_DTYPE)
    if r == 0 and not ATTENTION:  # constant logits: c = 1 / Nout
        s = s / n_out
    if HAS_BIAS:
        d = tl.arange(0, BLOCK_D).to(tl.int64)
        bias_offsets = parent[:, None] * stride_bias_j + d[None, :] * stride_bias_d
        s += tl.load(bias_ptr + bias_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    here = tl.cast(r, tl.int64) * size + offsets
    tl.store(s_all_ptr + here, s, mask=mask)
    if ATTENTION:  # "v_0" is T / sqrt(Dout), so V_1 = 0 + v_0 is what the agreements take
        if r == 0:
            v = _over_sqrt(s, d_out)
        else:
            v = tl.where(mask, squash_rows(s, eps, True), 0.0)
    else:
        v = tl.where(mask, squash_rows(s, eps), 0.0)
    if r == 0:
        V = tl.zeros_like(s)
        tl.store(V_all_ptr + here, V, mask=mask)
    else:
        V = tl.load(V_all_ptr + here, mask=mask, other=0.0)
    if r + 1 < iterations:
        tl.store(V_all_ptr + here + size, V + v, mask=mask)
    else:
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def routing_output_grad_kernel(
    s_all_ptr,
    grad_v_ptr,
    grad_s_all_ptr,
    batch,
    n_out,
    d_out,
    iterations,
    eps: tl.float64,
    stride_gv_b,
    stride_gv_j,
    stride_gv_d,
    DETACHED: tl.constexpr,
    EXP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (capsule blocks,): ``grad_s_all[R-1] = squash'(s_(R-1)) grad v`` (EXP: exp_squash';
    when the parents are chunked, before the backward's other kernels); DETACHED also zeroes the
    other iterations."""
    rows = tl.cast(tl.program_id(0), tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (rows < batch * n_out)[:, None] & (d < d_out)[None, :]
    offsets = rows[:, None] * d_out + d[None, :]
    gv_offsets = (rows // n_out * stride_gv_b + rows % n_out * stride_gv_j)[:, None]
    grad_v = tl.load(grad_v_ptr + gv_offsets + d[None, :] * stride_gv_d, mask=mask, other=0.0)
    size = tl.cast(batch, tl.int64) * n_out * d_out
    last = tl.cast(iterations - 1, tl.int64) * size + offsets
    s = tl.load(s_all_ptr + last, mask=mask, other=0.0)
    grad_s = tl.where(mask, squash_rows_backward(s, grad_v.to(COMPUTE_DTYPE), eps, EXP), 0.0)
    tl.store(grad_s_all_ptr + last, grad_s, mask=mask)
    if DETACHED:
        for r in range(iterations - 1):
            tl.store(grad_s_all_ptr + tl.cast(r, tl.int64) * size + offsets, tl.zeros_like(s),
                     mask=mask)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _output_grad_tile(
    s_all_ptr,
    grad_v_ptr,
    b,
    j0,
    n_out,
    d_out,
    state,
    mask,
    s_offset,
    eps,
    stride_gv_b,
    stride_gv_j,
    stride_gv_d,
    EXP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    JG: tl.constexpr,
    DP: tl.constexpr,
):
    """gs_(R-1) = squash'(s_(R-1)) grad v (EXP: exp_squash') for a parent group's
    [BLOCK_B, JG * DP] tile."""
    j, d, _ = _group_columns(j0, n_out, d_out, JG, DP)
    gv_offsets = b[:, None] * stride_gv_b + (j * stride_gv_j + d * stride_gv_d)[None, :]
    grad_v = tl.load(grad_v_ptr + gv_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    s = tl.load(s_all_ptr + s_offset + state, mask=mask, other=0.0)
    return tl.where(mask, _squash_backward_tile(s, grad_v, eps, EXP, BLOCK_B, JG, DP), 0.0)


@triton.jit
def routing_backward_partial_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    s_all_ptr,
    V_all_ptr,
    grad_v_ptr,
    grad_s_all_ptr,
    partial_ptr,
    coef_ptr,
    coef_grad_ptr,
    lse_ptr,
    inner_ptr,
    prior_ptr,
    grad_prior_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    capsules_per_slice,
    parent_chunks,
    r,
    eps: tl.float64,
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
    stride_p_i,
    stride_p_j,
    stride_gv_b,
    stride_gv_j,
    stride_gv_d,
    GRAD_FROM_OUTPUT: tl.constexpr,
    STORE_COEFFICIENTS: tl.constexpr,
    CHUNKED: tl.constexpr,
    ATTENTION: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    JB: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    PHASE: tl.constexpr,
):
    """Grid (slices * sample blocks * parent chunks,), iteration r >= 1: ``partial[slice, b] = sum
    over the slice of ga_r u_hat`` (the slice's part of gV_r), and (STORE_COEFFICIENTS) c_r and
    ga_r into slot r-1 of coef and coef_grad (contiguous [R-1, B, Nin, Nout], COMPUTE_DTYPE) for
    the pairs kernel. PHASE 0 does both; the backward can instead run it twice (with
    STORE_COEFFICIENTS, not CHUNKED), PHASE 1 storing c_r and ga_r only and PHASE 2 forming the
    partial sums from the stored ga_r, so that neither holds all of V_r, gs_r and the sums in
    registers at once. gs_r is read from grad_s_all[r], or with GRAD_FROM_OUTPUT (r = R-1)
    computed from s_all[r] and grad v and stored by slice 0. CHUNKED: a program owns JA parents
    and reads slot r-1 of lse and inner ([R-1, B, Nin], ``routing_softmax_stats_kernel``).
    ATTENTION (self-attention routing, r = 1): gs from exp_squash'; the coefficient stored for
    the pairs kernel is softmax + prior (HAS_PRIOR), and the prior's gradient
    ``sum over the block's samples of gc_ij = u_hat_ij . gs_j`` goes to grad_prior
    [sample blocks, Nin, Nout] (COMPUTE_DTYPE), summed over the blocks by the host."""
    HAS_B: tl.constexpr = JB > 0
    JBG: tl.constexpr = JB if HAS_B else JA
    slice_id, b, b_mask, first, last, j0 = _program_block(
        tl.program_id(0), batch, n_in, capsules_per_slice, parent_chunks, BLOCK_B, JA
    )
    sample_block = tl.cast(tl.program_id(0) // parent_chunks % tl.cdiv(batch, BLOCK_B), tl.int64)
    state_a, mask_a, parents_a, uh_a, w_a, w_mask_a = _group(
        b, b_mask, j0, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
        stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
    )  # fmt: skip
    state_b, mask_b, parents_b = state_a, mask_a, parents_a
    uh_b, w_b, w_mask_b = uh_a, w_a, w_mask_a
    if HAS_B:
        state_b, mask_b, parents_b, uh_b, w_b, w_mask_b = _group(
            b, b_mask, JA, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
            stride_w_j, stride_w_d, stride_w_k, DIN, KP, JB, DP,
        )  # fmt: skip
    k = tl.arange(0, KP).to(tl.int64)
    u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
    u_mask = b_mask[:, None] & (k < DIN)[None, :]
    offset = tl.cast(r, tl.int64) * batch * n_out * d_out
    coef_offsets, parent_a, coef_mask_a, parent_b, coef_mask_b = _coefficient_offsets(
        b, b_mask, r - 1, batch, n_in, n_out, j0, JA, JBG
    )
    V_a = tl.zeros((BLOCK_B, JA * DP), dtype=COMPUTE_DTYPE)  # unread in PHASE 2
    if PHASE != 2:
        V_a = tl.load(V_all_ptr + offset + state_a, mask=mask_a, other=0.0)
    V_b = V_a
    if HAS_B and PHASE != 2:
        V_b = tl.load(V_all_ptr + offset + state_b, mask=mask_b, other=0.0)
    stats_at = (tl.cast(r - 1, tl.int64) * batch + b) * n_in
    if PHASE == 2:
        gs_a = V_a  # unread
        gs_b = V_b
    elif GRAD_FROM_OUTPUT:
        gs_a = _output_grad_tile(s_all_ptr, grad_v_ptr, b, j0, n_out, d_out, state_a, mask_a,
                                 offset, eps, stride_gv_b, stride_gv_j, stride_gv_d, ATTENTION,
                                 COMPUTE_DTYPE, BLOCK_B, JA, DP)  # fmt: skip
        gs_b = gs_a
        if HAS_B:
            gs_b = _output_grad_tile(s_all_ptr, grad_v_ptr, b, JA, n_out, d_out, state_b, mask_b,
                                     offset, eps, stride_gv_b, stride_gv_j, stride_gv_d,
                                     ATTENTION, COMPUTE_DTYPE, BLOCK_B, JB, DP)  # fmt: skip
        if slice_id == 0:
            tl.store(grad_s_all_ptr + offset + state_a, gs_a, mask=mask_a)
            if HAS_B:
                tl.store(grad_s_all_ptr + offset + state_b, gs_b, mask=mask_b)
    else:
        gs_a = tl.load(grad_s_all_ptr + offset + state_a, mask=mask_a, other=0.0)
        gs_b = gs_a
        if HAS_B:
            gs_b = tl.load(grad_s_all_ptr + offset + state_b, mask=mask_b, other=0.0)
    sum_a = tl.zeros((BLOCK_B, JA * DP), dtype=COMPUTE_DTYPE)
    sum_b = tl.zeros((BLOCK_B, JBG * DP), dtype=COMPUTE_DTYPE)
    for capsule in range(first, last):
        capsule = tl.cast(capsule, tl.int64)
        U = u_offsets  # unused without FROM_WEIGHT
        if FROM_WEIGHT:
            U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
        capsule_u_hat = u_hat_ptr + capsule * stride_uh_i
        capsule_w = w_ptr + capsule * stride_w_i
        tile_a, _ = _u_hat_group(U, capsule_u_hat, uh_a, mask_a, capsule_w, w_a, w_mask_a,
                                 FROM_WEIGHT, PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
        tile_b = tile_a
        if HAS_B:
            tile_b, _ = _u_hat_group(U, capsule_u_hat, uh_b, mask_b, capsule_w, w_b, w_mask_b,
                                     FROM_WEIGHT, PRECISION, DOT_DTYPE, COMPUTE_DTYPE)  # fmt: skip
        coef_at = coef_offsets + capsule * n_out
        if PHASE == 2:  # the ga_r that PHASE 1 stored
            ga_a = tl.load(coef_grad_ptr + coef_at + parent_a[None, :], mask=coef_mask_a, other=0.0)
            ga_b = ga_a
            if HAS_B:
                ga_b = tl.load(coef_grad_ptr + coef_at + parent_b[None, :], mask=coef_mask_b,
                               other=0.0)  # fmt: skip
        else:
            grad_c_a = _parent_sum(tile_a * gs_a, parents_a, BLOCK_B, JA, DP)
            grad_c_b = grad_c_a
            if HAS_B:
                grad_c_b = _parent_sum(tile_b * gs_b, parents_b, BLOCK_B, JBG, DP)
            if HAS_PRIOR:  # this sample block's part of grad prior: sum over its samples of gc
                prior_at = grad_prior_ptr + (sample_block * n_in + capsule) * n_out
                tl.store(prior_at + parent_a, tl.sum(grad_c_a, axis=0), mask=parent_a < n_out)
                if HAS_B:
                    tl.store(prior_at + parent_b, tl.sum(grad_c_b, axis=0), mask=parent_b < n_out)
            if CHUNKED:
                c_a = _chunk_coefficients(tile_a, V_a, parents_a, lse_ptr, stats_at + capsule,
                                          b_mask, BLOCK_B, JA, DP)  # fmt: skip
                inner = tl.load(inner_ptr + stats_at + capsule, mask=b_mask, other=0.0)
                ga_a = c_a * (grad_c_a - inner[:, None])
                c_b, ga_b = c_a, ga_a
            else:
                c_a, c_b = _softmax_parents(
                    _agreement(tile_a, V_a, parents_a, BLOCK_B, JA, DP),
                    _agreement(tile_b, V_b, parents_b, BLOCK_B, JBG, DP),
                    HAS_B,
                )
                ga_a, ga_b = _softmax_parents_backward(c_a, c_b, grad_c_a, grad_c_b, HAS_B)
            if HAS_PRIOR and STORE_COEFFICIENTS:  # the pairs kernel's c is softmax + prior
                c_a, c_b = _add_prior(c_a, c_b, prior_ptr, capsule, parent_a, parent_b, n_out,
                                      stride_p_i, stride_p_j, HAS_B, COMPUTE_DTYPE)  # fmt: skip
            if STORE_COEFFICIENTS:
                tl.store(coef_ptr + coef_at + parent_a[None, :], c_a, mask=coef_mask_a)
                tl.store(coef_grad_ptr + coef_at + parent_a[None, :], ga_a, mask=coef_mask_a)
                if HAS_B:
                    tl.store(coef_ptr + coef_at + parent_b[None, :], c_b, mask=coef_mask_b)
                    tl.store(coef_grad_ptr + coef_at + parent_b[None, :], ga_b, mask=coef_mask_b)
        if PHASE != 1:
            sum_a += _spread(ga_a, BLOCK_B, JA, DP) * tile_a
            if HAS_B:
                sum_b += _spread(ga_b, BLOCK_B, JB, DP) * tile_b
    if PHASE != 1:
        out = partial_ptr + tl.cast(slice_id, tl.int64) * batch * n_out * d_out
        tl.store(out + state_a, sum_a, mask=mask_a)
        if HAS_B:
            tl.store(out + state_b, sum_b, mask=mask_b)


@triton.jit
def routing_backward_combine_kernel(
    partial_ptr,
    s_all_ptr,
    grad_later_ptr,
    grad_s_all_ptr,
    batch,
    n_out,
    d_out,
    slices,
    r,
    eps: tl.float64,
    FIRST: tl.constexpr,
    ATTENTION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (capsule blocks,), iteration r >= 1: gV_r = sum of the slices; the gradient reaching
    v_(r-1) is ``go = gV_r + ... + gV_(R-1)`` (kept in grad_later [B, Nout, Dout]; FIRST: r = R-1,
    nothing kept yet); writes grad_s_all[r-1] = squash'(s_(r-1)) go. ATTENTION (R = 2): "v_0" is
    T / sqrt(Dout), so grad_s_all[0] = grad T = go / sqrt(Dout)."""
    offsets, mask, _ = _capsule_rows(tl.program_id(0), batch, n_out, d_out, BLOCK_ROWS, BLOCK_D)
    size = tl.cast(batch, tl.int64) * n_out * d_out
    grad_out = _sum_slices(partial_ptr, offsets, mask, slices, size, COMPUTE_DTYPE)
    if not FIRST:
        grad_out += tl.load(grad_later_ptr + offsets, mask=mask, other=0.0)
    if r > 1:
        tl.store(grad_later_ptr + offsets, grad_out, mask=mask)
    earlier = tl.cast(r - 1, tl.int64) * size + offsets
    if ATTENTION:
        grad_s = _over_sqrt(grad_out, d_out)
    else:
        s = tl.load(s_all_ptr + earlier, mask=mask, other=0.0)
        grad_s = tl.where(mask, squash_rows_backward(s, grad_out, eps), 0.0)
    tl.store(grad_s_all_ptr + earlier, grad_s, mask=mask)


@triton.jit
def _first_term(grad_s_all_ptr, state, mask, n_out, ATTENTION: tl.constexpr):
    """Iteration 0's term of g_u_hat: gs_0 / Nout (constant coefficients 1 / Nout), or with
    ATTENTION grad T (T = sum_i u_hat_i, so every child gets all of it)."""
    gs = tl.load(grad_s_all_ptr + state, mask=mask, other=0.0)
    if not ATTENTION:
        gs = gs / n_out
    return gs


@triton.jit
def _first_terms(grad_s_all_ptr, state_a, mask_a, state_b, mask_b, n_out, ATTENTION: tl.constexpr,
                 HAS_B: tl.constexpr):  # fmt: skip
    """Both parent groups' iteration-0 terms (see _first_term)."""
    g_a = _first_term(grad_s_all_ptr, state_a, mask_a, n_out, ATTENTION)
    g_b = g_a
    if HAS_B:
        g_b = _first_term(grad_s_all_ptr, state_b, mask_b, n_out, ATTENTION)
    return g_a, g_b


@triton.jit
def _iteration_state(V_all_ptr, grad_s_all_ptr, offset, state_a, mask_a, state_b, mask_b,
                     HAS_B: tl.constexpr):  # fmt: skip
    """V_r and gs_r of both parent groups (``offset`` = r * B * Nout * Dout)."""
    V_a = tl.load(V_all_ptr + offset + state_a, mask=mask_a, other=0.0)
    gs_a = tl.load(grad_s_all_ptr + offset + state_a, mask=mask_a, other=0.0)
    V_b, gs_b = V_a, gs_a
    if HAS_B:
        V_b = tl.load(V_all_ptr + offset + state_b, mask=mask_b, other=0.0)
        gs_b = tl.load(grad_s_all_ptr + offset + state_b, mask=mask_b, other=0.0)
    return V_a, gs_a, V_b, gs_b


@triton.jit
def _stored_term(g_a, g_b, V_a, gs_a, V_b, gs_b, coef_ptr, coef_grad_ptr, slot, parent_a,
                 parent_b, coef_mask_a, coef_mask_b, HAS_B: tl.constexpr, BLOCK_B: tl.constexpr,
                 JA: tl.constexpr, JB: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """Adds one iteration's ``c_r gs_r + ga_r V_r`` to g_u_hat of both parent groups, with c_r
    and ga_r read from their slot of the stored coefficients."""
    c_a = tl.load(coef_ptr + slot + parent_a[None, :], mask=coef_mask_a, other=0.0)
    ga_a = tl.load(coef_grad_ptr + slot + parent_a[None, :], mask=coef_mask_a, other=0.0)
    g_a += _spread(c_a, BLOCK_B, JA, DP) * gs_a
    g_a += _spread(ga_a, BLOCK_B, JA, DP) * V_a
    if HAS_B:
        c_b = tl.load(coef_ptr + slot + parent_b[None, :], mask=coef_mask_b, other=0.0)
        ga_b = tl.load(coef_grad_ptr + slot + parent_b[None, :], mask=coef_mask_b, other=0.0)
        g_b += _spread(c_b, BLOCK_B, JB, DP) * gs_b
        g_b += _spread(ga_b, BLOCK_B, JB, DP) * V_b
    return g_a, g_b


@triton.jit
def _pairs_term(tile_a, tile_b, V_a, V_b, gs_a, gs_b, parents_a, parents_b, g_a, g_b, prior_a,
                prior_b, WITH_LOGITS: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_B: tl.constexpr,
                BLOCK_B: tl.constexpr, JA: tl.constexpr, JBG: tl.constexpr,
                DP: tl.constexpr):  # fmt: skip
    """Adds one iteration's ``c_r gs_r`` (and with WITH_LOGITS ``ga_r V_r``) to g_u_hat of both
    parent groups, recomputing c_r and ga_r from the u_hat tiles. HAS_PRIOR: c_r is the softmax
    plus the prior rows prior_a [JA] and prior_b [JBG]; ga_r is the softmax's."""
    c_a, c_b = _softmax_parents(
        _agreement(tile_a, V_a, parents_a, BLOCK_B, JA, DP),
        _agreement(tile_b, V_b, parents_b, BLOCK_B, JBG, DP),
        HAS_B,
    )
    coupling_a, coupling_b = c_a, c_b
    if HAS_PRIOR:
        coupling_a += prior_a[None, :]
        coupling_b += prior_b[None, :]
    g_a += _spread(coupling_a, BLOCK_B, JA, DP) * gs_a
    if HAS_B:
        g_b += _spread(coupling_b, BLOCK_B, JBG, DP) * gs_b
    if WITH_LOGITS:
        ga_a, ga_b = _softmax_parents_backward(
            c_a, c_b,
            _parent_sum(tile_a * gs_a, parents_a, BLOCK_B, JA, DP),
            _parent_sum(tile_b * gs_b, parents_b, BLOCK_B, JBG, DP),
            HAS_B,
        )  # fmt: skip
        g_a += _spread(ga_a, BLOCK_B, JA, DP) * V_a
        if HAS_B:
            g_b += _spread(ga_b, BLOCK_B, JBG, DP) * V_b
    return g_a, g_b


@triton.jit
def _contract_group(g, W, U, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                    COMPUTE_DTYPE: tl.constexpr):  # fmt: skip
    """For one parent group: grad u [BLOCK_B, KP] = g W_i and grad W_i^T [JG * DP, KP] = g^T U_i
    (g cast to the input dtype, so half inputs use the tensor cores; float32 accumulation).
    SPLIT_K, for float32 groups of 128 columns or more: grad u as 4 dots over a quarter of the
    columns each, summed after. On the FMA units a [BLOCK_B, KP] product gives each thread one
    output, so it reads two operands from shared memory per FMA; 4 products in one batched dot
    give it 4 outputs that share operands (MNIST B=128: the pairs kernel modelled 114.7 ->
    101.4 us). Variants that recompute u_hat keep more tiles live and would spill with it."""
    g = g.to(W.dtype)
    rows: tl.constexpr = g.shape[0]
    columns: tl.constexpr = g.shape[1]
    if SPLIT_K and W.dtype == tl.float32 and columns >= 128:
        g_parts = tl.permute(tl.reshape(g, (rows, 4, columns // 4)), (1, 0, 2))
        w_parts = tl.reshape(tl.trans(W), (4, columns // 4, W.shape[0]))
        grad_u = tl.sum(tl.dot(g_parts, w_parts, input_precision=PRECISION,
                               out_dtype=COMPUTE_DTYPE), axis=0)  # fmt: skip
    else:
        grad_u = tl.dot(g, tl.trans(W), input_precision=PRECISION, out_dtype=COMPUTE_DTYPE)
    grad_w = tl.dot(tl.trans(g), U, input_precision=PRECISION, out_dtype=COMPUTE_DTYPE)
    return grad_u, grad_w


@triton.jit
def _grad_weight_offsets(j0, n_out, d_out, DIN: tl.constexpr, KP: tl.constexpr,
                         JG: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """Offsets and mask of a parent group's [JG * DP, KP] tile of one capsule in a contiguous
    [..., Nin, Nout, Dout, Din] gradient."""
    j, d, columns = _group_columns(j0, n_out, d_out, JG, DP)
    k = tl.arange(0, KP).to(tl.int64)
    offsets = (j * d_out + d)[:, None] * DIN + k[None, :]
    mask = columns[:, None] & (k < DIN)[None, :]
    return offsets, mask


@triton.jit
def _batch_chunk_program(pid, batch, n_in, capsules_per_slice, blocks_per_chunk, chunks,
                         parent_chunks, BLOCK_B: tl.constexpr, JA: tl.constexpr):  # fmt: skip
    """The work of a program of grid (slices * batch chunks * parent chunks,), parent chunks
    fastest: its first parent, slice, batch chunk, capsules [first, last) and sample blocks
    [first_block, last_block)."""
    j0 = pid % parent_chunks * JA
    slice_id = pid // parent_chunks // chunks
    chunk = pid // parent_chunks % chunks
    first = slice_id * capsules_per_slice
    last = tl.minimum(first + capsules_per_slice, n_in)
    first_block = chunk * blocks_per_chunk
    last_block = tl.minimum(first_block + blocks_per_chunk, tl.cdiv(batch, BLOCK_B))
    return j0, slice_id, chunk, first, last, first_block, last_block


@triton.jit
def _grad_weight_tiles(grad_w_ptr, chunk, j0, n_in, n_out, d_out, DIN: tl.constexpr,
                       KP: tl.constexpr, JA: tl.constexpr, JB: tl.constexpr,
                       DP: tl.constexpr):  # fmt: skip
    """The grad W offsets and masks of both parent groups (group B's equal to A's without one)
    and the batch chunk's slot of grad_w ([chunks, Nin, Nout, Dout, Din])."""
    gw_a, gw_mask_a = _grad_weight_offsets(j0, n_out, d_out, DIN, KP, JA, DP)
    gw_b, gw_mask_b = gw_a, gw_mask_a
    if JB > 0:
        gw_b, gw_mask_b = _grad_weight_offsets(JA, n_out, d_out, DIN, KP, JB, DP)
    gw_chunk = grad_w_ptr + tl.cast(chunk, tl.int64) * n_in * n_out * d_out * DIN
    return gw_a, gw_mask_a, gw_b, gw_mask_b, gw_chunk


@triton.jit(do_not_specialize=["blocks_per_chunk"])
def routing_backward_pairs_kernel(
    u_hat_ptr,
    u_ptr,
    w_ptr,
    s_all_ptr,
    V_all_ptr,
    grad_v_ptr,
    grad_s_all_ptr,
    coef_ptr,
    coef_grad_ptr,
    lse_ptr,
    inner_ptr,
    prior_ptr,
    grad_u_hat_ptr,
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
    iterations,
    eps: tl.float64,
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
    stride_p_i,
    stride_p_j,
    stride_gv_b,
    stride_gv_j,
    stride_gv_d,
    LAST_ONLY: tl.constexpr,
    STORED_COEFFICIENTS: tl.constexpr,
    CHUNKED: tl.constexpr,
    ATTENTION: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    FROM_WEIGHT: tl.constexpr,
    DIN: tl.constexpr,
    KP: tl.constexpr,
    JA: tl.constexpr,
    JB: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HELD: tl.constexpr,
):
    """Grid (slices * batch chunks * parent chunks,): a program walks the sample blocks of its
    batch chunk and, for each, the capsules of its slice, forming g_u_hat = sum_r c_r gs_r +
    ga_r V_r per tile. Stored u_hat: writes grad u_hat (contiguous [B, Nin, Nout, Dout], input
    dtype). FROM_WEIGHT: writes grad u (contiguous [B, Nin, Din], input dtype; CHUNKED: the
    parent chunk's part, [parent chunks, B, Nin, Din] in COMPUTE_DTYPE) and accumulates the batch
    chunk's grad W into its slot of grad_w (contiguous [chunks, Nin, Nout, Dout, Din],
    COMPUTE_DTYPE). STORED_COEFFICIENTS: c_r and ga_r come from coef and coef_grad, else from a
    recomputed u_hat (CHUNKED: with lse and inner, [R-1, B, Nin]); HELD (with
    STORED_COEFFICIENTS: 0, 1 or 2, at most R): the leading terms of g_u_hat whose state tiles a
    sample block loads once for all its capsules (1: gs_0; 2: also V_1 and gs_1). LAST_ONLY: only
    the last weighted sum is differentiated; gs_(R-1) is computed here, and stored (with zeros for
    the other iterations) by slice 0. ATTENTION (self-attention routing, R = 2, not LAST_ONLY):
    g_u_hat = grad T + c_1 gs_1 + ga_1 V_1, with c_1 = softmax + prior (HAS_PRIOR)."""
    HAS_B: tl.constexpr = JB > 0
    JBG: tl.constexpr = JB if HAS_B else JA
    pid = tl.program_id(0)
    j0, slice_id, chunk, first, last, first_block, last_block = _batch_chunk_program(
        pid, batch, n_in, capsules_per_slice, blocks_per_chunk, chunks, parent_chunks, BLOCK_B, JA
    )
    gw_a, gw_mask_a, gw_b, gw_mask_b, gw_chunk = _grad_weight_tiles(
        grad_w_ptr, chunk, j0, n_in, n_out, d_out, DIN, KP, JA, JB, DP
    )
    size = tl.cast(batch, tl.int64) * n_out * d_out
    last_offset = tl.cast(iterations - 1, tl.int64) * size
    k = tl.arange(0, KP).to(tl.int64)
    for block in range(first_block, last_block):
        b, b_mask = _sample_block(block, batch, BLOCK_B)
        state_a, mask_a, parents_a, uh_a, w_a, w_mask_a = _group(
            b, b_mask, j0, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
            stride_w_j, stride_w_d, stride_w_k, DIN, KP, JA, DP,
        )  # fmt: skip
        state_b, mask_b, parents_b = state_a, mask_a, parents_a
        uh_b, w_b, w_mask_b = uh_a, w_a, w_mask_a
        if HAS_B:
            state_b, mask_b, parents_b, uh_b, w_b, w_mask_b = _group(
                b, b_mask, JA, n_out, d_out, stride_uh_b, stride_uh_j, stride_uh_d,
                stride_w_j, stride_w_d, stride_w_k, DIN, KP, JB, DP,
            )  # fmt: skip
        u_offsets = b[:, None] * stride_u_b + k[None, :] * stride_u_k
        u_mask = b_mask[:, None] & (k < DIN)[None, :]
        coef_rows, parent_a, coef_mask_a, parent_b, coef_mask_b = _coefficient_offsets(
            b, b_mask, 0, batch, n_in, n_out, j0, JA, JBG
        )
        stats_rows = b * n_in  # + slot * B * Nin: lse and inner of iteration slot + 1
        if LAST_ONLY:
            # the only term: c_(R-1) gs_(R-1); V_(R-1) = 0 when R = 1 gives c = 1/Nout
            gs_a = _output_grad_tile(s_all_ptr, grad_v_ptr, b, j0, n_out, d_out, state_a, mask_a,
                                     last_offset, eps, stride_gv_b, stride_gv_j, stride_gv_d,
                                     ATTENTION, COMPUTE_DTYPE, BLOCK_B, JA, DP)  # fmt: skip
            V_a = tl.load(V_all_ptr + last_offset + state_a, mask=mask_a, other=0.0)
            gs_b, V_b = gs_a, V_a
            if HAS_B:
                gs_b = _output_grad_tile(s_all_ptr, grad_v_ptr, b, JA, n_out, d_out, state_b,
                                         mask_b, last_offset, eps, stride_gv_b, stride_gv_j,
                                         stride_gv_d, ATTENTION, COMPUTE_DTYPE, BLOCK_B, JB,
                                         DP)  # fmt: skip
                V_b = tl.load(V_all_ptr + last_offset + state_b, mask=mask_b, other=0.0)
            if slice_id == 0:
                tl.store(grad_s_all_ptr + last_offset + state_a, gs_a, mask=mask_a)
                if HAS_B:
                    tl.store(grad_s_all_ptr + last_offset + state_b, gs_b, mask=mask_b)
                for r in range(iterations - 1):  # detached iterations get no gradient
                    zero_offset = tl.cast(r, tl.int64) * size
                    tl.store(grad_s_all_ptr + zero_offset + state_a, tl.zeros_like(gs_a),
                             mask=mask_a)  # fmt: skip
                    if HAS_B:
                        tl.store(grad_s_all_ptr + zero_offset + state_b, tl.zeros_like(gs_b),
                                 mask=mask_b)  # fmt: skip
        if STORED_COEFFICIENTS and HELD >= 1:  # the same for every capsule of the slice
            first_a, first_b = _first_terms(grad_s_all_ptr, state_a, mask_a, state_b, mask_b,
                                            n_out, ATTENTION, HAS_B)  # fmt: skip
        if STORED_COEFFICIENTS and HELD >= 2:
            V1_a, gs1_a, V1_b, gs1_b = _iteration_state(
                V_all_ptr, grad_s_all_ptr, size, state_a, mask_a, state_b, mask_b, HAS_B
            )
        for capsule in range(first, last):
            capsule = tl.cast(capsule, tl.int64)
            U = u_offsets  # unused without FROM_WEIGHT
            if FROM_WEIGHT:
                U = tl.load(u_ptr + capsule * stride_u_i + u_offsets, mask=u_mask, other=0.0)
            capsule_u_hat = u_hat_ptr + capsule * stride_uh_i
            capsule_w = w_ptr + capsule * stride_w_i
            if STORED_COEFFICIENTS:
                # g_u_hat = gs_0 / Nout + sum over r >= 1 of c_r gs_r + ga_r V_r, with c_r and
                # ga_r stored by the backward partial kernels: no u_hat needed
                W_a = U
                W_b = U
                if FROM_WEIGHT:
                    W_a = tl.load(capsule_w + w_a, mask=w_mask_a, other=0.0)
                    if HAS_B:
                        W_b = tl.load(capsule_w + w_b, mask=w_mask_b, other=0.0)
                # iteration 0 has constant logits: its term is gs_0 / Nout (ATTENTION: grad T)
                if HELD >= 1:
                    g_a, g_b = first_a, first_b
                else:
                    g_a, g_b = _first_terms(grad_s_all_ptr, state_a, mask_a, state_b, mask_b,
                                            n_out, ATTENTION, HAS_B)  # fmt: skip
                coef_at = coef_rows + capsule * n_out
                loaded_from = 1
                if HELD >= 2:
                    g_a, g_b = _stored_term(g_a, g_b, V1_a, gs1_a, V1_b, gs1_b, coef_ptr,
                                            coef_grad_ptr, coef_at, parent_a, parent_b,
                                            coef_mask_a, coef_mask_b, HAS_B, BLOCK_B, JA, JB,
                                            DP)  # fmt: skip
                    loaded_from = 2
                for r in range(loaded_from, iterations):
                    offset = tl.cast(r, tl.int64) * size
                    slot = coef_at + tl.cast(r - 1, tl.int64) * batch * n_in * n_out
                    V_a, gs_a, V_b, gs_b = _iteration_state(V_all_ptr, grad_s_all_ptr, offset,
                                                            state_a, mask_a, state_b, mask_b,
                                                            HAS_B)  # fmt: skip
                    g_a, g_b = _stored_term(g_a, g_b, V_a, gs_a, V_b, gs_b, coef_ptr,
                                            coef_grad_ptr, slot, parent_a, parent_b, coef_mask_a,
                                            coef_mask_b, HAS_B, BLOCK_B, JA, JB, DP)  # fmt: skip
            else:
                # the coefficients from a recomputed u_hat tile
                prior_a = tl.zeros((JA,), dtype=COMPUTE_DTYPE)
                prior_b = tl.zeros((JBG,), dtype=COMPUTE_DTYPE)
                if HAS_PRIOR:
                    prior_a, prior_b = _add_prior(prior_a, prior_b, prior_ptr, capsule, parent_a,
                                                  parent_b, n_out, stride_p_i, stride_p_j, HAS_B,
                                                  COMPUTE_DTYPE)  # fmt: skip
                tile_a, W_a = _u_hat_group(U, capsule_u_hat, uh_a, mask_a, capsule_w, w_a,
                                           w_mask_a, FROM_WEIGHT, PRECISION, DOT_DTYPE,
                                           COMPUTE_DTYPE)  # fmt: skip
                tile_b, W_b = tile_a, W_a
                if HAS_B:
                    tile_b, W_b = _u_hat_group(U, capsule_u_hat, uh_b, mask_b, capsule_w, w_b,
                                               w_mask_b, FROM_WEIGHT, PRECISION, DOT_DTYPE,
                                               COMPUTE_DTYPE)  # fmt: skip
                if LAST_ONLY and CHUNKED:
                    last_slot = tl.maximum(iterations - 1, 1) - 1
                    stats_at = tl.cast(last_slot, tl.int64) * batch * n_in + stats_rows + capsule
                    c_a = _chunk_coefficients(tile_a, V_a, parents_a, lse_ptr, stats_at, b_mask,
                                              BLOCK_B, JA, DP)  # fmt: skip
                    g_a = _spread(c_a, BLOCK_B, JA, DP) * gs_a
                    g_b = g_a
                elif LAST_ONLY:
                    g_a, g_b = _pairs_term(tile_a, tile_b, V_a, V_b, gs_a, gs_b, parents_a,
                                           parents_b, tl.zeros_like(tile_a),
                                           tl.zeros_like(tile_b), prior_a, prior_b, False,
                                           HAS_PRIOR, HAS_B, BLOCK_B, JA, JBG, DP)  # fmt: skip
                elif CHUNKED:
                    g_a = _first_term(grad_s_all_ptr, state_a, mask_a, n_out, ATTENTION)
                    g_b = g_a
                    for r in range(1, iterations):
                        offset = tl.cast(r, tl.int64) * size
                        V_a = tl.load(V_all_ptr + offset + state_a, mask=mask_a, other=0.0)
                        gs_a = tl.load(grad_s_all_ptr + offset + state_a, mask=mask_a, other=0.0)
                        stats_at = tl.cast(r - 1, tl.int64) * batch * n_in + stats_rows + capsule
                        c_a = _chunk_coefficients(tile_a, V_a, parents_a, lse_ptr, stats_at,
                                                  b_mask, BLOCK_B, JA, DP)  # fmt: skip
                        inner = tl.load(inner_ptr + stats_at, mask=b_mask, other=0.0)
                        grad_c = _parent_sum(tile_a * gs_a, parents_a, BLOCK_B, JA, DP)
                        g_a += _spread(c_a * (grad_c - inner[:, None]), BLOCK_B, JA, DP) * V_a
                        if HAS_PRIOR:
                            c_a += prior_a[None, :]
                        g_a += _spread(c_a, BLOCK_B, JA, DP) * gs_a
                    g_b = g_a
                else:
                    g_a, g_b = _first_terms(grad_s_all_ptr, state_a, mask_a, state_b, mask_b,
                                            n_out, ATTENTION, HAS_B)  # fmt: skip
                    for r in range(1, iterations):
                        V_a, gs_a, V_b, gs_b = _iteration_state(
                            V_all_ptr, grad_s_all_ptr, tl.cast(r, tl.int64) * size, state_a,
                            mask_a, state_b, mask_b, HAS_B,
                        )  # fmt: skip
                        g_a, g_b = _pairs_term(tile_a, tile_b, V_a, V_b, gs_a, gs_b, parents_a,
                                               parents_b, g_a, g_b, prior_a, prior_b, True,
                                               HAS_PRIOR, HAS_B, BLOCK_B, JA, JBG,
                                               DP)  # fmt: skip
            if FROM_WEIGHT:
                grad_u, grad_w_a = _contract_group(g_a, W_a, U, STORED_COEFFICIENTS, PRECISION,
                                                   COMPUTE_DTYPE)  # fmt: skip
                capsule_gw = gw_chunk + capsule * n_out * d_out * DIN
                if block > first_block:
                    grad_w_a += tl.load(capsule_gw + gw_a, mask=gw_mask_a, other=0.0)
                tl.store(capsule_gw + gw_a, grad_w_a, mask=gw_mask_a)
                if HAS_B:
                    grad_u_b, grad_w_b = _contract_group(g_b, W_b, U, STORED_COEFFICIENTS,
                                                         PRECISION, COMPUTE_DTYPE)  # fmt: skip
                    grad_u += grad_u_b
                    if block > first_block:
                        grad_w_b += tl.load(capsule_gw + gw_b, mask=gw_mask_b, other=0.0)
                    tl.store(capsule_gw + gw_b, grad_w_b, mask=gw_mask_b)
                gu_offsets = (b[:, None] * n_in + capsule) * DIN + k[None, :]
                if CHUNKED:  # this parent chunk's part; the host sums the chunks
                    gu_offsets += tl.cast(pid % parent_chunks, tl.int64) * batch * n_in * DIN
                tl.store(grad_u_ptr + gu_offsets, grad_u.to(grad_u_ptr.dtype.element_ty),
                         mask=u_mask)  # fmt: skip
            else:
                # grad u_hat [B, Nin, Nout, Dout]: state offsets plus the capsule's rows
                rows = b[:, None] * ((n_in - 1) * n_out * d_out) + capsule * n_out * d_out
                out = grad_u_hat_ptr + rows
                tl.store(out + state_a, g_a.to(grad_u_hat_ptr.dtype.element_ty), mask=mask_a)
                if HAS_B:
                    tl.store(out + state_b, g_b.to(grad_u_hat_ptr.dtype.element_ty), mask=mask_b)
