"""squash over the last dim of a [rows, D] view: forward and backward, one row block per program.

``v = s * n / ((1 + n) sqrt(n + eps))`` with ``n = |s|^2``, evaluated as ``g(r) u`` (r = |s|,
u = s / r) from a scaled norm and, for r >= 1, powers of 1/r, so that no square or cube of r
overflows: exact to the dtype's precision for every finite s. The gradient is a tangential plus
a radial part (``squash_rows_backward``); both are 0 at s = 0. Divisions and square roots are
IEEE round-to-nearest. Math in COMPUTE_DTYPE (float32, or float64 for float64); offsets int64.
"""

import triton
import triton.language as tl


@triton.jit
def _row_block(pid, n_rows, d, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
               DENSE: tl.constexpr):  # fmt: skip
    """Rows [BLOCK_ROWS] and columns [BLOCK_D] (int64) of a program, the mask of the
    [BLOCK_ROWS, BLOCK_D] block and its offsets in the contiguous output. DENSE (d == BLOCK_D):
    the mask is the rows' only, and the offsets are multiples of BLOCK_D that the compiler can
    see, so a thread loads and stores whole vectors and the per-row math is spread over few
    lanes (with a runtime d, each row's scalars were computed by all 8 lanes of its row)."""
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    if DENSE:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < BLOCK_D)
        out_offsets = rows[:, None] * BLOCK_D + cols[None, :]
    else:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
        out_offsets = rows[:, None] * d + cols[None, :]
    return rows, cols, mask, out_offsets


@triton.jit
def _load_block(ptr, rows, cols, mask, out_offsets, stride_row, stride_col,
                COMPUTE_DTYPE: tl.constexpr, DENSE: tl.constexpr):  # fmt: skip
    """A [BLOCK_ROWS, BLOCK_D] block of a [rows, D] view (DENSE: laid out like the output)."""
    if DENSE:
        offsets = out_offsets
    else:
        offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest (``/`` compiles to an approximate float32 division on GPUs)."""
    if a.dtype == tl.float64:
        out = a / b  # float64 division is IEEE already
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def sqrt_rn(x):
    """sqrt(x) rounded to nearest (``tl.sqrt`` is approximate in float32 on GPUs)."""
    if x.dtype == tl.float64:
        out = tl.sqrt(x)
    else:
        out = tl.sqrt_rn(x)
    return out


@triton.jit
def _inverse_hypot_one(w):
    """1 / hypot(1, w) for w >= 0 (w may be huge; w^2 is never formed above w = 1)."""
    small = w <= 1.0
    z = tl.where(small, w, div_rn(tl.full(w.shape, 1.0, w.dtype), tl.where(small, 1.0, w)))
    k = div_rn(tl.full(w.shape, 1.0, w.dtype), sqrt_rn(1.0 + z * z))
    return tl.where(small, k, k * z)


@triton.jit
def _directions(s, huge):
    """Per row of a [rows, D] block, without overflow or underflow: m = max |s_d|, |s| = m t
    (t the norm of s / m), the unit vector u = s / |s| (0 for a zero row) and 1 / |s| clamped
    to ``huge`` (the dtype's largest value)."""
    m = tl.max(tl.abs(s), axis=1)
    positive = m > 0
    one = tl.full(m.shape, 1.0, m.dtype)
    # s / m by one reciprocal per row; rows below 2^-64 are first scaled by 2^64 (exact), so that
    # 1 / m cannot overflow
    pre = tl.where(m < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
    inv_m = div_rn(one, tl.where(positive, m * pre, 1.0))
    t = (s * pre[:, None]) * inv_m[:, None]
    t_norm = sqrt_rn(tl.sum(t * t, axis=1))
    u = t * div_rn(one, tl.where(positive, t_norm, 1.0))[:, None]
    inv_r = tl.minimum(div_rn(inv_m * pre, t_norm), huge)  # inf for subnormal m, clamped
    return m, t_norm, u, inv_r


@triton.jit
def _tangential_radial(u, f, dg, grad_v):
    """grad s of v = g(|s|) u: ``f (gv - (u . gv) u) + g' (u . gv) u``, each part well
    conditioned (f = g / |s|, g' = dg / d|s|; [rows] each)."""
    radial = tl.sum(u * grad_v, axis=1)[:, None]
    return f[:, None] * (grad_v - radial * u) + (dg[:, None] * radial) * u


@triton.jit
def squash_factors(s, eps, huge, SLOPE: tl.constexpr):
    """squash's pieces for every row of a [rows, D] block, for any finite s without overflow,
    by the formulas of ``fastcaps.torch_backend.squash_factors``: u = s / |s| [rows, D] (0 for
    a zero row) and per row [rows] g = |v|, f = g / |s| and g' = dg/d|s| (f and g' only with
    SLOPE; else zeros). ``huge``: the largest finite value of the dtype."""
    m, t_norm, u, inv_r = _directions(s, huge)
    one = tl.full(m.shape, 1.0, m.dtype)
    # eps arrives as float64 (the kernels annotate it: Triton passes a Python float as float32,
    # which moved float64 results by up to 2e-10 of their size)
    w = tl.minimum(inv_r * sqrt_rn(tl.full(m.shape, eps, m.dtype)), huge)  # sqrt(eps) / |s|
    b = _inverse_hypot_one(w)  # |s| / sqrt(|s|^2 + eps)
    g = div_rn(b, 1.0 + inv_r * inv_r)
    if SLOPE:
        a = div_rn(one, m * t_norm + inv_r)  # |s| / (1 + |s|^2); m * t_norm may be inf
        f = a * b
        wb = w * b
        dg = f * (2.0 * a * inv_r + wb * wb)
    else:
        f = tl.zeros_like(m)
        dg = tl.zeros_like(m)
    return u, g, f, dg


@triton.jit
def _largest(x):
    """The largest finite value of x's dtype (float32 or float64)."""
    if x.dtype == tl.float64:
        out = 1.7976931348623157e308
    else:
        out = 3.4028234663852886e38
    return out


@triton.jit
def squash_rows(s, eps, EXP: tl.constexpr = False):
    """v for every row of a [rows, D] block (in the block's dtype): ``g(|s|) s / |s|``, exact
    to the dtype's precision for every finite s; squash, or with EXP exp_squash (eps unused)."""
    if EXP:
        u, g, _f, _dg = exp_squash_factors(s, _largest(s))
    else:
        u, g, _f, _dg = squash_factors(s, eps, _largest(s), False)
    return u * g[:, None]


@triton.jit
def squash_rows_backward(s, grad_v, eps, EXP: tl.constexpr = False):
    """grad s for every row of a [rows, D] block, given grad v: a tangential plus a radial part,
    ``f (gv - (u . gv) u) + g' (u . gv) u``, each well conditioned (squash, or with EXP
    exp_squash)."""
    if EXP:
        u, _g, f, dg = exp_squash_factors(s, _largest(s))
    else:
        u, _g, f, dg = squash_factors(s, eps, _largest(s), True)
    return _tangential_radial(u, f, dg, grad_v)


@triton.jit
def squash_forward_kernel(
    s_ptr,
    v_ptr,
    n_rows,
    d,
    stride_s_row,
    stride_s_col,
    eps: tl.float64,
    EXP: tl.constexpr,
    DENSE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """v = squash(s), or with EXP exp_squash(s) (eps unused). DENSE: s is contiguous with
    d == BLOCK_D."""
    rows, cols, mask, out_offsets = _row_block(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D,
                                               DENSE)  # fmt: skip
    s = _load_block(s_ptr, rows, cols, mask, out_offsets, stride_s_row, stride_s_col,
                    COMPUTE_DTYPE, DENSE)  # fmt: skip
    v = squash_rows(s, eps, EXP)
    tl.store(v_ptr + out_offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def squash_backward_kernel(
    s_ptr,
    grad_v_ptr,
    grad_s_ptr,
    n_rows,
    d,
    stride_s_row,
    stride_s_col,
    stride_g_row,
    stride_g_col,
    eps: tl.float64,
    EXP: tl.constexpr,
    DENSE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad s of squash, or with EXP of exp_squash (the identity at s = 0; eps unused). DENSE:
    s and grad v are contiguous with d == BLOCK_D."""
    rows, cols, mask, out_offsets = _row_block(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D,
                                               DENSE)  # fmt: skip
    s = _load_block(s_ptr, rows, cols, mask, out_offsets, stride_s_row, stride_s_col,
                    COMPUTE_DTYPE, DENSE)  # fmt: skip
    grad_v = _load_block(grad_v_ptr, rows, cols, mask, out_offsets, stride_g_row, stride_g_col,
                         COMPUTE_DTYPE, DENSE)  # fmt: skip
    grad_s = squash_rows_backward(s, grad_v, eps, EXP)
    tl.store(grad_s_ptr + out_offsets, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# exp_squash (Efficient-CapsNet): v = (1 - exp(-|s|)) s / |s|
# ----------------------------------------------------------------------------------------------


@triton.jit
def _one_minus_exp_neg_over(r):
    """(1 - exp(-r)) / r for 0 <= r < 0.5, by its Taylor series (15 terms: below float64's
    rounding at r = 0.5); ``1 - exp(-r)`` itself cancels for small r."""
    out = tl.full(r.shape, 1.0, r.dtype)
    for n in tl.static_range(15, 0, -1):  # Horner: 1 - r/2 (1 - r/3 (1 - ...))
        out = 1.0 - r * out * (1.0 / (n + 1.0))
    return out


@triton.jit
def exp_squash_factors(s, huge):
    """exp_squash's pieces for every row of a [rows, D] block, for any finite s (the norm as in
    ``squash_factors``): u = s / |s| [rows, D] (0 for a zero row) and per row [rows]
    g = 1 - exp(-|s|) (the output length), f = g / |s| (1 at s = 0) and g' = exp(-|s|)."""
    m, t_norm, u, inv_r = _directions(s, huge)
    r = m * t_norm  # may round to inf; then exp(-r) = 0, g = 1 and f = 0
    small = r < 0.5
    series = _one_minus_exp_neg_over(tl.where(small, r, 0.0))
    dg = tl.exp(-r)
    g = tl.where(small, r * series, 1.0 - dg)
    f = tl.where(small, series, g * tl.where(m > 0, inv_r, 0.0))
    return u, g, f, dg
