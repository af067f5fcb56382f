"""Launch heuristics for every Triton kernel, in one place: block sizes, warps, grid splits, the
float32 dot precision and the compiler options every launch pins."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# Streaming multiprocessors assumed when no GPU is present (the interpreter, the static sm_90
# report): an H100 SXM.
DEFAULT_SMS = 132

# Every launch pins floating-point contraction (a*b+c as one FMA) instead of inheriting Triton's
# default, which Triton 3.9 announces will change.
COMPILER_OPTIONS = {"enable_fp_fusion": True}

# torch.get_float32_matmul_precision() -> the input precision of float32 tl.dot: "highest" is
# full float32 on the FMA units; "high" and "medium" opt in to the tensor cores (3 TF32 passes,
# about float32 accuracy; or 1 TF32 pass, 10-bit mantissa inputs).
FLOAT32_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
TORCH_DTYPES = {v: k for k, v in TL_DTYPES.items()}


def compute_dtype(dtype: torch.dtype):
    """The in-kernel math type: float64 for float64 tensors, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' tl.dot for inputs of ``dtype`` (only float32 has a
    choice; it follows ``torch.set_float32_matmul_precision``)."""
    if dtype != torch.float32:
        return "ieee"
    return FLOAT32_DOT_PRECISION[torch.get_float32_matmul_precision()]


@functools.cache
def min_dot_k(dtype: torch.dtype) -> int:
    """The smallest K Triton's NVIDIA backend accepts for tl.dot on ``dtype`` (16 on Triton 3.6
    for every 16/32/64-bit type; smaller for 32- and 64-bit on newer releases)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        element = {torch.float64: tl.float64, torch.float32: tl.float32}.get(dtype, tl.bfloat16)
        return max(int(min_dot_size(GPUTarget("cuda", 90, 32))(element, element)[2]), 1)
    except Exception:  # an older or different backend: the conservative bound
        return 16


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


@dataclass(frozen=True)
class RowLaunch:
    """Settings for kernels that give each program a block of rows of a [rows, D] view."""

    block_rows: int
    block_d: int
    num_warps: int
    grid: tuple[int]


@functools.lru_cache(maxsize=1024)  # pure; called on every launch
def row_launch(
    n_rows: int, d: int, max_elements: int = 4096, min_programs: int = 1, per_thread: int = 16
) -> RowLaunch:
    """Whole rows per program (D is padded to a power of two and masked), up to ``max_elements``
    per program, fewer when that leaves under ``min_programs`` programs; about ``per_thread``
    values per thread."""
    block_d = triton.next_power_of_2(d)
    block_rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, max_elements // block_d))
    while block_rows > 1 and triton.cdiv(n_rows, block_rows) < min_programs:
        block_rows //= 2
    # about 16 values per thread: the squash backward's IEEE divisions spill with more
    num_warps = max(1, min(8, block_rows * block_d // (32 * per_thread)))
    return RowLaunch(block_rows, block_d, num_warps, (triton.cdiv(n_rows, block_rows),))


def vector_launch(n_rows: int, d: int) -> RowLaunch:
    """The squash and exp_squash kernels (a vector per row): 8 values per thread, whatever the
    dtype. With 16, Triton 3.6 caps the float32 squash forward at 128 registers and spills, and
    float64's backward spills on sm_90; with 8, no variant spills under Triton 3.6 or 3.9, the
    MNIST layer at B = 32 fills a wave (144 programs), and the model is as fast or faster (B =
    128 forward 13.0 -> 11.5 us)."""
    return row_launch(n_rows, d, max_elements=2048, per_thread=8)


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """How one routing kernel splits a layer: programs own ``block_b`` samples (``num_warps``
    warps), a slice of ``capsules_per_slice`` input capsules and one of ``parent_chunks`` chunks
    of parents, ``slices x chunks x parent_chunks`` programs in all; each program walks
    ``blocks_per_chunk`` of the ``sample_blocks`` sample blocks. The partial-sum kernels have one
    sample block per chunk (``chunks = sample_blocks``)."""

    block_b: int
    num_warps: int
    sample_blocks: int
    capsules_per_slice: int
    slices: int
    blocks_per_chunk: int
    chunks: int
    parent_chunks: int = 1
    dot_dtype: object = None  # the tl dtype of the u_hat dot's operands
    kp: int = 16  # Din padded to the dot's minimum K for dot_dtype
    precision: str = "ieee"  # input_precision of float32 dots
    held: int = 0  # the pairs kernel's HELD (see routing_plan)

    @property
    def programs(self) -> int:
        return self.slices * self.chunks * self.parent_chunks


@dataclass(frozen=True)
class RoutingPlan:
    """How the routing kernels tile a layer (see ``fastcaps.kernels.routing``): ``forward`` for
    the forward partial sums, ``backward`` for the backward ones (more tiles live, so fewer
    samples per program), ``pairs`` for the pairs kernel, ``stats`` for the softmax statistics
    kernel of chunked parents; ``split_backward`` (None unless the u_hat dot may use the tensor
    cores and the parents are not chunked) for the backward partial sums run as two passes when
    the coefficients are kept. The parents are two power-of-two groups of ``ja`` and ``jb`` (0:
    none) parents, or, when they are too many for the registers, ``parent_chunks`` chunks of
    ``ja`` (``jb`` = 0). Dout is padded to ``dp``, and each tiling pads Din to the minimum K of
    its dot's dtype."""

    forward: Tiling
    backward: Tiling
    pairs: Tiling
    stats: Tiling
    split_backward: Tiling | None
    ja: int
    jb: int
    dp: int

    @property
    def parent_chunks(self) -> int:
        return self.forward.parent_chunks

    @property
    def chunked(self) -> bool:
        return self.parent_chunks > 1

    def pairs_for(self, stored: bool) -> Tiling:
        """The pairs kernel's tiling when it reads the stored coefficients (``stored``) or
        recomputes u_hat and the coefficients. Tensor cores (half inputs, TF32) only in the
        former: the recomputing kernel keeps more tiles live, and on tensor-core layouts it
        spills (MNIST B=128, detach_logits: float32 "high" 808 B, bfloat16 424 B; 6 iterations:
        bfloat16 760 B, float32 "medium" 768 B), so it runs full-float32 FMA dots (half inputs
        cast up). Static sm_90 model, MNIST bfloat16 forward + backward, detach_logits: B=128
        125.2 -> 107.9 us, B=32 70.3 -> 64.7; 6 iterations: B=128 946.7 -> 452.9. With stored
        coefficients, MNIST B=128 float32 "high": the pairs kernel 101.4 us on the FMA units,
        72.9 us in 3-pass TF32. The pairs tiling pads Din only to the dots' N (8); the recomputing
        kernel's u_hat dot takes Din as its K, padded to that dot's minimum."""
        if stored:
            return self.pairs
        work = tl.float64 if self.pairs.dot_dtype == tl.float64 else tl.float32
        kp = max(self.pairs.kp, min_dot_k(TORCH_DTYPES[work]))
        return replace(self.pairs, dot_dtype=work, precision="ieee", kp=kp, held=0)

    def kernel_options(self, tiling: Tiling) -> dict:
        """The constexprs and launch options of a routing kernel with this tiling."""
        return dict(
            KP=tiling.kp, JA=self.ja, JB=self.jb, DP=self.dp, PRECISION=tiling.precision,
            BLOCK_B=tiling.block_b, DOT_DTYPE=tiling.dot_dtype, num_warps=tiling.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip


def parent_groups(n_out: int) -> tuple[int, int]:
    """(ja, jb): the largest power of two <= Nout, and the rest rounded up (0 when none)."""
    ja = 1 << (n_out.bit_length() - 1)
    rest = n_out - ja
    return ja, (triton.next_power_of_2(rest) if rest else 0)


# Test hook: tiling choices to force (see ``override_routing_plan``).
_PLAN_OVERRIDES: dict = {}


@contextlib.contextmanager
def override_routing_plan(**fields):
    """Force tiling choices of every RoutingPlan made inside the block: ``block_b`` (every
    kernel), ``capsules_per_slice`` (every kernel), ``chunks`` (pairs), ``programs`` (the target
    that replaces the SM count), ``store_coefficients`` (see ``store_coefficients``), ``held``
    (the pairs kernel's HELD), ``parent_chunks`` > 1 with ``chunk_parents`` (walk the parents in
    chunks of that many). Tests use it to run the split, chunked and recomputing paths on small
    shapes."""
    previous = dict(_PLAN_OVERRIDES)
    _PLAN_OVERRIDES.update(fields)
    try:
        yield
    finally:
        _PLAN_OVERRIDES.clear()
        _PLAN_OVERRIDES.update(previous)


# Layers whose split buffers stay under this size are split further when that fills the GPU
# (their memory is negligible; their grid would otherwise be a few programs).
SMALL_SPLIT_BYTES = 16 << 20


def _warps(block_b: int, element_bytes: int, n_in: int, target: int) -> int:
    """Warps of a routing program: 8 for tiles of 32 float32 samples or more (16 float64), or
    when the capsules alone cannot fill the GPU (like Efficient-CapsNet's 16, where the model is
    faster with 8, 23.6 -> 21.7 us forward + backward at B=128 float32, and Triton 3.6 no longer
    spills 192 B in the float32 attention pairs kernel); else 4, two programs per SM."""
    return 8 if block_b * max(element_bytes, 4) >= 128 or n_in < target else 4


def _partial_tiling(
    batch: int,
    n_in: int,
    n_out: int,
    d_out: int,
    max_block_b: int,
    element_bytes: int,
    target: int,
    parent_chunks: int = 1,
) -> Tiling:
    """Tiling of a partial-sum kernel. A slice holds at least Dout capsules, so the partial sums
    (``slices x B x Nout x Dout``) never exceed the logits' size (B x Nin x Nout); within that,
    programs get as many samples as possible (up to ``max_block_b``; at least 16, the dot's
    minimum M) while the programs still fill every SM once (one 8-warp or two 4-warp programs
    per SM). A layer too small to fill the GPU that way (few samples and few capsules, like
    Efficient-CapsNet's 16) whose u_hat would take at most ``SMALL_SPLIT_BYTES`` is split down
    to one capsule per slice: its partial sums are then at most that small u_hat's size."""
    max_slices = max(1, n_in // max(d_out, 1))
    block_b = min(max_block_b, max(16, triton.next_power_of_2(batch)))
    while block_b > 16 and triton.cdiv(batch, block_b) * max_slices < target:
        block_b //= 2
    u_hat_bytes = batch * n_in * n_out * d_out * element_bytes
    if triton.cdiv(batch, block_b) * max_slices < target and u_hat_bytes <= SMALL_SPLIT_BYTES:
        max_slices = n_in
    block_b = _PLAN_OVERRIDES.get("block_b") or block_b
    num_warps = _warps(block_b, element_bytes, n_in, target)
    resident = 1 if num_warps == 8 else 2
    sample_blocks = triton.cdiv(batch, block_b)
    slices = max(1, min(max_slices, resident * target // (sample_blocks * parent_chunks)))
    per_slice = _PLAN_OVERRIDES.get("capsules_per_slice") or triton.cdiv(n_in, slices)
    return Tiling(block_b, num_warps, sample_blocks, per_slice, triton.cdiv(n_in, per_slice),
                  1, sample_blocks, parent_chunks)  # fmt: skip


def _pairs_tiling(
    batch: int,
    n_in: int,
    n_out: int,
    d_out: int,
    d_in: int,
    block_b: int,
    element_bytes: int,
    target: int,
    parent_chunks: int = 1,
) -> Tiling:
    """Tiling of the pairs kernel: no partial sums over the capsules, so they are split finely,
    about one program per SM; grad W is summed over ``chunks`` of the batch only when the
    capsules alone cannot fill the GPU, and its partial sums stay below the logits' size
    (``chunks * Dout * Din <= B``) or, when that leaves the GPU under a wave, below
    ``SMALL_SPLIT_BYTES``."""
    block_b = _PLAN_OVERRIDES.get("block_b") or block_b
    num_warps = _warps(block_b, element_bytes, n_in, target)
    target = max(1, target * (1 if num_warps == 8 else 2) // parent_chunks)
    per_slice = _PLAN_OVERRIDES.get("capsules_per_slice") or triton.cdiv(n_in, min(n_in, target))
    slices = triton.cdiv(n_in, per_slice)
    sample_blocks = triton.cdiv(batch, block_b)
    chunks = max(1, min(sample_blocks, target // slices, batch // max(d_out * d_in, 1)))
    if slices * chunks < target:  # under a wave: more chunks while their grad W stays small
        weight_bytes = n_in * n_out * d_out * d_in * element_bytes
        affordable = max(1, SMALL_SPLIT_BYTES // max(weight_bytes, 1))
        chunks = max(chunks, min(sample_blocks, target // slices, affordable))
    chunks = _PLAN_OVERRIDES.get("chunks") or chunks
    per_chunk = triton.cdiv(sample_blocks, chunks)
    return Tiling(block_b, num_warps, sample_blocks, per_slice, slices, per_chunk,
                  triton.cdiv(sample_blocks, per_chunk), parent_chunks)  # fmt: skip


# Plans kept per plan function (a process meets few layers; the cache restarts when full).
PLAN_CACHE_SIZE = 1024


def _device_key(device) -> tuple[str, int | None]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, device.index)


def cached_plan(make_plan: Callable[..., RoutingPlan]) -> Callable[..., RoutingPlan]:
    """Cache a plan function of (batch, Nin, Nout, Dout, Din, dtype, device) per layer, device,
    float32 matmul precision and override: making a plan costs about 0.3 ms of host time (2 cores
    at 2026-11-28, Python 3.11), twice per forward + backward, which a GPU at the MNIST layer
    would otherwise wait for."""
    cache: dict = {}

    @functools.wraps(make_plan)
    def plan(batch, n_in, n_out, d_out, d_in, dtype, device) -> RoutingPlan:
        precision = torch.get_float32_matmul_precision()
        overrides = tuple(sorted(_PLAN_OVERRIDES.items()))
        key = (batch, n_in, n_out, d_out, d_in, dtype, _device_key(device), precision, overrides)
        found = cache.get(key)
        if found is None:
            if len(cache) >= PLAN_CACHE_SIZE:
                cache.clear()
            found = cache[key] = make_plan(batch, n_in, n_out, d_out, d_in, dtype, device)
        return found

    plan.cache_clear = cache.clear
    return plan


@cached_plan
def routing_plan(
    batch: int, n_in: int, n_out: int, d_out: int, d_in: int, dtype: torch.dtype, device
) -> RoutingPlan:
    """The tiling of the routing kernels for a layer on ``device`` (see RoutingPlan): blocks of
    up to 64 samples in the forward kernels, 32 in the backward ones, which keep more tiles in
    registers (16 for float64, whose values take two registers each; 16 where a tensor-core dot
    would spill at 32)."""
    target = _PLAN_OVERRIDES.get("programs") or multiprocessors(torch.device(device))
    element = TL_DTYPES[dtype]
    wide = 8 if dtype == torch.float64 else 4  # bytes of the math type: smaller float64 tiles
    ja, jb = parent_groups(n_out)
    dp = max(triton.next_power_of_2(d_out), triton.cdiv(16, min(ja, jb or ja)))
    columns = 256 if wide == 4 else 128  # a tile's columns (parents x Dout) that fit registers
    parent_chunks = _PLAN_OVERRIDES.get("parent_chunks") or 1
    if parent_chunks > 1 or ja * dp > columns or jb * dp > columns // 2:
        # too many parents for one tile: chunks of ja, coupled through softmax statistics
        # chunks as wide as the first group of a 10-parent layer: 128 float32 columns
        ja = _PLAN_OVERRIDES.get("chunk_parents") or max(
            1, 1 << ((max(columns // 2 // triton.next_power_of_2(d_out), 1)).bit_length() - 1)
        )
        jb = 0
        dp = max(triton.next_power_of_2(d_out), triton.cdiv(16, ja))
        parent_chunks = triton.cdiv(n_out, ja)
    forward = _partial_tiling(batch, n_in, n_out, d_out, 64 if wide == 4 else 16, wide, target,
                              parent_chunks)  # fmt: skip
    # float64 forward: 4 warps (8 make ptxas spill around the float64 dot)
    forward = replace(forward, dot_dtype=element, num_warps=4 if wide == 8 else forward.num_warps)
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or (
        dtype == torch.float32 and dot_precision(dtype) != "ieee"
    )
    if tensor_cores and forward.block_b == 32:
        # where the blocks would be 32 samples (batches of about 64), u_hat on the tensor cores
        # takes 16 (4 warps, two programs per SM): at 32 its tensor-core layouts spill (MNIST
        # B=64: bfloat16 240 B, float32 "high" 256 B; with 4 warps 256-328 B). Static sm_90
        # model, MNIST B=64 forward + backward, with the backward's rules below: bfloat16
        # 134.9 -> 122.6 us, float32 "high" 164.4 -> 129.4, "medium" 130.6 -> 110.2
        forward = replace(
            _partial_tiling(batch, n_in, n_out, d_out, 16, wide, target, parent_chunks),
            dot_dtype=element,
        )
    # the backward partial kernel holds more tiles than the forward: 32-sample blocks (16 for
    # float64) and its u_hat dot on the FMA units in full float32 (half inputs too), whose
    # tensor-core layouts would spill at 32
    work = tl.float64 if dtype == torch.float64 else tl.float32
    backward = replace(
        _partial_tiling(
            batch, n_in, n_out, d_out, 32 if wide == 4 else 16, wide, target, parent_chunks
        ),
        dot_dtype=work,
    )
    pairs = replace(
        _pairs_tiling(
            batch, n_in, n_out, d_out, d_in, backward.block_b, wide, target, parent_chunks
        ),
        dot_dtype=element,
    )
    stats = replace(_partial_tiling(batch, n_in, n_out, d_out, 32 if wide == 4 else 16, wide,
                                    target),
                    dot_dtype=work)  # fmt: skip
    # where the u_hat dot may run on the tensor cores (half inputs; float32 under "high" or
    # "medium") and the parents are not chunked, the one-pass backward partial kernel runs it
    # there, with 16-sample blocks (the pairs kernel keeps the blocks above). Static sm_90
    # model, forward + backward: MNIST bfloat16 B=32 110.0 -> 106.0 us, B=64 134.9 -> 132.1,
    # 6 iterations B=128 960.8 -> 946.7; float32 "high" B=128 232.7 -> 218.6 (Triton 3.6:
    # 302.2 -> 269.7), B=512 841.2 -> 782.3. Not with chunked parents (100 classes B=32,
    # bfloat16 1,125 -> 1,268), and full-float32 FMA dots gain nothing from 16 (float32
    # B=128: 81.4 -> 83.1 us for the two launches)
    tensor_core_backward = tensor_cores and parent_chunks == 1
    if tensor_core_backward:
        backward = replace(
            _partial_tiling(batch, n_in, n_out, d_out, 16, wide, target, parent_chunks),
            dot_dtype=element,
        )
    # where the u_hat dot runs on the tensor cores in one pass (half inputs, or float32 under
    # "medium") with the forward's 64-sample blocks (batches of about 128 and more) and the
    # parents are not chunked: the backward partial sums as two passes (PHASE 1, then 2) of
    # those blocks, each holding fewer tiles than one pass, which at 64 samples would spill.
    # Static sm_90 model, MNIST layer: bfloat16 B=128 188.8 -> 167.4 us forward + backward,
    # B=512 667.5 -> 537.3; not used where a probe modelled it slower: 3-pass TF32 ("high",
    # 261.3 -> 275.7 at B=128) and 32-sample blocks (bfloat16 B=32, 110.0 -> 120.2)
    split = None
    one_pass = dtype in (torch.float16, torch.bfloat16) or (
        dtype == torch.float32 and dot_precision(dtype) == "tf32"
    )
    if one_pass and parent_chunks == 1 and forward.block_b >= 64:
        split = replace(forward, dot_dtype=element)
    tilings = {}
    for name, tiling in (("forward", forward), ("backward", backward), ("pairs", pairs),
                         ("stats", stats), ("split_backward", split)):  # fmt: skip
        if tiling is None:
            tilings[name] = None
            continue
        operand = TORCH_DTYPES[tiling.dot_dtype]
        # the one-pass backward partial kernel's FMA dots are full-precision float32 (the
        # pairs kernel's: see pairs_for)
        precision = dot_precision(operand)
        if name == "backward" and not tensor_core_backward:
            precision = "ieee"
        if name == "stats" and precision == "tf32x3":
            # chunked parents' softmax statistics: 3-pass TF32 spills (100 classes B=32: 16 B);
            # full float32 is modelled faster as well (forward + backward 1,180.7 -> 1,119.2 us)
            precision = "ieee"
        # Din is only an N of the pairs kernel's dots (grad u = g W, grad W = g^T U), which
        # need no padding to the minimum K (16 for float32 under Triton 3.6, and for half
        # inputs): 8 at least, the tensor cores' N. Static sm_90 model, MNIST B=128, the pairs
        # kernel: bfloat16 58.9 -> 46.1 us (Triton 3.6: 58.9 -> 44.7), float32 under Triton 3.6
        # 148.4 -> 101.1
        kp = max(triton.next_power_of_2(d_in), 8 if name == "pairs" else min_dot_k(operand))
        tilings[name] = replace(tiling, kp=kp, precision=precision)
    # the pairs kernel with stored coefficients holds the sample block's gs_0, V_1 and gs_1 in
    # registers for all its capsules instead of reloading them for each (HELD = 2); with TF32
    # dots it holds gs_0 only (with V_1 and gs_1 at MNIST B=128: 3-pass TF32 spills 8 B, and
    # 1-pass TF32 16 B under Triton 3.6), and in float64 none (gs_0: 24 B). Static sm_90 model,
    # MNIST B=128, the pairs kernel: float32 101.4 -> 92.7 us, bfloat16 46.1 -> 37.4, "high"
    # 72.9 -> 70.0, "medium" 55.7 -> 52.7
    pairs = tilings["pairs"]
    held = 0 if wide == 8 else 1 if pairs.precision in ("tf32", "tf32x3") else 2
    tilings["pairs"] = replace(pairs, held=_PLAN_OVERRIDES.get("held", held))
    return RoutingPlan(**tilings, ja=ja, jb=jb, dp=dp)


def stacked_capsules(tiling: Tiling, d_in: int) -> int:
    """Capsules per dot in the forward's first pass (r = 0: the plain sum of u_hat formed from u
    and the weight), so that capsules, not zeros, fill a dot whose minimum K exceeds Din (16
    for half inputs, and for float32 under Triton 3.6): ``kp / next_power_of_2(Din)``. Static
    sm_90 model, MNIST B=128: that launch 27.7 -> 15.2 us in float32 under Triton 3.6, 5.5 ->
    5.2 in bfloat16."""
    return max(1, tiling.kp // triton.next_power_of_2(d_in))


@cached_plan
def predictions_plan(
    batch: int, n_in: int, n_out: int, d_out: int, d_in: int, dtype: torch.dtype, device
) -> RoutingPlan:
    """The tiling of the predictions kernels: the routing forward kernels' for the forward, the
    pairs kernel's for the backward but with larger sample blocks, since the backward holds only
    grad u_hat's, the weight's and u's tiles: 32 samples for float32 (at B = 32 the pairs
    tiling's 16 with 4 warps spills under Triton 3.6; a batch of one such block is split over
    twice the capsule slices to fill a wave), 64 for half inputs (modelled MNIST B=128
    bfloat16 backward 37.8 -> 20.1 us; float32 with 64 would take 255 registers)."""
    plan = routing_plan(batch, n_in, n_out, d_out, d_in, dtype, device)
    block_b = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}.get(dtype)
    if block_b and not _PLAN_OVERRIDES.get("block_b"):
        target = _PLAN_OVERRIDES.get("programs") or multiprocessors(torch.device(device))
        pairs = _pairs_tiling(batch, n_in, n_out, d_out, d_in, block_b, 4, target,
                              plan.parent_chunks)  # fmt: skip
        if pairs.sample_blocks == 1 and pairs.programs < target:
            # one sample block (B = 32): twice the slices, so that the grid fills a wave
            pairs = _pairs_tiling(batch, n_in, n_out, d_out, d_in, block_b, 4, 2 * target,
                                  plan.parent_chunks)  # fmt: skip
        old = plan.pairs
        pairs = replace(pairs, dot_dtype=old.dot_dtype, kp=old.kp, precision=old.precision)
        plan = replace(plan, pairs=pairs)
    return plan


def store_coefficients(iterations: int, d_out: int) -> bool:
    """Whether the backward keeps c_r and ga_r of the iterations r >= 1 for the pairs kernel, in
    two [R-1, B, Nin, Nout] buffers, so that the pairs kernel needs neither u_hat nor the logits.
    Only while the two take at most half of u_hat's size (4 (R-1) <= Dout: up to 5 iterations at
    Dout = 16); otherwise the pairs kernel recomputes them."""
    forced = _PLAN_OVERRIDES.get("store_coefficients")
    return forced if forced is not None else 4 * (iterations - 1) <= d_out


def combine_launch(batch: int, n_out: int, d_out: int, device) -> RowLaunch:
    """The combine kernels: one output capsule per row, enough programs to spread the slices'
    sum over the SMs."""
    return row_launch(batch * n_out, d_out, max_elements=1024,
                      min_programs=multiprocessors(torch.device(device)))  # fmt: skip
