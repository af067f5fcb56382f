"""The "torch" and "triton" backends against fastcaps.reference: outputs and every gradient.

Without a GPU the triton backend runs under Triton's interpreter (see tests/conftest.py) in
float64 and float32: the interpreter has no half-precision arithmetic. With a GPU it runs on CUDA
in float16 and bfloat16 as well.
"""

import contextlib
import functools

import pytest
import torch

import fastcaps
from conftest import (
    CUDA,
    SHAPES,
    TF32_TOLERANCE,
    TOLERANCES,
    TRITON,
    TRITON_PATHS,
    Shape,
    as_float64_leaf,
    assert_close,
    backend_params,
    check_squash,
    grads,
    make_layer_inputs,
    saved_state,
    skip_cpu_triton_beside_a_gpu,
)
from fastcaps import reference

BACKEND_DTYPES = [
    ("torch", torch.float64),
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
    ("triton", torch.float64),
    ("triton", torch.float32),
] + ([("triton", torch.float16), ("triton", torch.bfloat16)] if CUDA else [])


ALL = backend_params(BACKEND_DTYPES)
FULL_PRECISION = backend_params([p for p in BACKEND_DTYPES if p[1] == torch.float64])
BACKENDS = backend_params([("torch", torch.float64), ("triton", torch.float64)])


def check_capsule_routing(backend, u, weight, bias, iterations, detach_logits, dtype, what="",
                          tolerance=None):  # fmt: skip
    """capsule_routing on ``backend`` matches the float64 reference in value and gradients
    (within ``dtype``'s tolerances, or ``tolerance``: see assert_close)."""
    v = fastcaps.capsule_routing(
        u, weight, iterations, bias, detach_logits=detach_logits, backend=backend
    )
    ref_inputs = [as_float64_leaf(t) for t in (u, weight, bias)]
    v_ref = reference.capsule_routing(
        *ref_inputs[:2], iterations, ref_inputs[2], detach_logits=detach_logits
    )
    assert v.dtype == u.dtype and v.shape == v_ref.shape
    assert_close(v, v_ref, dtype, f"{what} v", tolerance)
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = grads(v, (u, weight, bias), grad_v.to(v.device))
    expected = grads(v_ref, ref_inputs, grad_v)
    for name, g, e in zip(("u", "weight", "bias"), got, expected, strict=False):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"{what} grad {name}", tolerance)


@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_capsule_routing_matches_reference(
    on_device, backend, dtype, shape, iterations, bias, detach_logits
):
    u, weight, b = make_layer_inputs(shape, dtype, on_device, bias)
    check_capsule_routing(backend, u, weight, b, iterations, detach_logits, dtype)


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("iterations", [2, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_tiling_paths_match_reference(device, path, detach_logits, iterations):
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.triton_launch import override_routing_plan

    shape = Shape(20, 13, 3, 5, 3)  # 20 samples: two blocks of 16
    u, weight, bias = make_layer_inputs(shape, torch.float64, device, bias=True)
    with override_routing_plan(**TRITON_PATHS[path]):
        check_capsule_routing("triton", u, weight, bias, iterations, detach_logits, torch.float64)
        check_triton_dynamic_routing(u, weight, bias, iterations, detach_logits)


def check_triton_dynamic_routing(u, weight, bias, iterations, detach_logits, what=""):
    """dynamic_routing on the triton backend, from float64 predictions of u and weight, matches
    the reference in value and gradients."""
    u_hat = reference.predictions(u.detach(), weight.detach()).requires_grad_()
    v = fastcaps.dynamic_routing(
        u_hat, iterations, bias, detach_logits=detach_logits, backend="triton"
    )
    u_hat64, bias64 = as_float64_leaf(u_hat), as_float64_leaf(bias)
    v_ref = reference.dynamic_routing(u_hat64, iterations, bias64, detach_logits=detach_logits)
    assert_close(v, v_ref, torch.float64, f"{what} v")
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, g, e in zip(
        ("u_hat", "bias"),
        grads(v, (u_hat, bias), grad_v.to(u.device)),
        grads(v_ref, (u_hat64, bias64), grad_v),
        strict=True,
    ):
        assert_close(g, e, torch.float64, f"{what} grad {name}")


# The pairs kernel reading stored coefficients holds a sample block's leading state tiles in
# registers for all the capsules of its slice (HELD 1: gs_0; 2: also V_1 and gs_1): every
# setting, with one program walking two sample blocks of three capsules, two parent groups (8 +
# 2), and R = 1, which has no iteration 1 to hold.
@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("iterations", [1, 2, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("held", [0, 1, 2], ids=lambda h: f"held{h}")
def test_triton_pairs_held_state_matches_reference(device, held, iterations):
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.triton_launch import override_routing_plan, routing_plan, store_coefficients

    shape = Shape(20, 6, 10, 8, 3)
    with override_routing_plan(held=held, block_b=16, capsules_per_slice=3, chunks=1):
        plan = routing_plan(shape.B, shape.Nin, shape.Nout, shape.Dout, shape.Din,
                            torch.float64, device)  # fmt: skip
        pairs = plan.pairs_for(stored=True)
        assert (pairs.held, pairs.blocks_per_chunk, plan.jb) == (held, 2, 2)
        assert store_coefficients(iterations, shape.Dout)
        u, weight, bias = make_layer_inputs(shape, torch.float64, device, bias=True)
        what = f"held {held}"
        check_capsule_routing("triton", u, weight, bias, iterations, False, torch.float64, what)
        check_triton_dynamic_routing(u, weight, bias, iterations, False, what)


# The pairs kernel's float32 grad u over parent groups of 128 columns or more (8 parents of 16
# dims) runs as 4 batched dots whose sum is taken after (``_contract_group``, SPLIT_K): here
# with all 10 parents in one pass (groups of 8 + 2) and in chunks of 8 parents.
SPLIT_GRAD_U_PATHS = {
    "groups-8-2": dict(capsules_per_slice=3),
    "parent-chunks-of-8": dict(parent_chunks=2, chunk_parents=8, capsules_per_slice=3),
}


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("iterations", [2, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("path", SPLIT_GRAD_U_PATHS)
def test_triton_split_grad_u_matches_reference(device, path, iterations):
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.triton_launch import override_routing_plan, routing_plan, store_coefficients

    shape = Shape(20, 7, 10, 16, 8)
    with override_routing_plan(**SPLIT_GRAD_U_PATHS[path]):
        plan = routing_plan(shape.B, shape.Nin, shape.Nout, shape.Dout, shape.Din,
                            torch.float32, device)  # fmt: skip
        # the conditions of the split: a wide float32 group and stored coefficients
        assert plan.ja * plan.dp >= 128 and store_coefficients(iterations, shape.Dout)
        u, weight, bias = make_layer_inputs(shape, torch.float32, device, bias=True)
        check_capsule_routing("triton", u, weight, bias, iterations, False, torch.float32, path)


# Where the u_hat dot runs on the tensor cores in one pass with 64-sample blocks, the backward
# partial sums run as two passes of the partial-sum kernel (PHASE 1 keeps c_r and ga_r, PHASE 2
# sums ga_r u_hat); float32 under torch.set_float32_matmul_precision("medium") takes that path.
# Its dots read TF32 inputs, on the GPU and under the interpreter (fastcaps._interpreter rounds
# them the same way): "tf32" cases hold it to TF32_TOLERANCE; "exact" cases, with the
# interpreter's dots in full float32 (no GPU does that), check the two passes' algebra to float32
# tolerances.
SPLIT_BACKWARD_CASES = {
    # two sample blocks of 64 (the second 6 samples), parents as 8 + 2
    "two-blocks-8-2": Shape(70, 9, 10, 16, 8),
    # Dout 5 and Din 3 padded, 3 parents (2 + 1)
    "padded": Shape(70, 13, 3, 5, 3),
    # one parent, a batch smaller than the block
    "one-parent": Shape(3, 6, 1, 7, 5),
}


class _LaunchRecorder:
    """Stands in for a Triton kernel: records one keyword (a constexpr) of every launch and
    passes the launch on."""

    def __init__(self, kernel, keyword: str):
        self.kernel, self.keyword, self.values = kernel, keyword, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.values.append(kwargs[self.keyword])
            return self.kernel[grid](*args, **kwargs)

        return launch


TWO_PASS_RUNS = [
    pytest.param(dots, iterations, id=f"{dots}-R{iterations}")
    for dots, iterations in [("exact", 2), ("exact", 3), ("exact", 4), ("tf32", 3)]
]


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("dots,iterations", TWO_PASS_RUNS)
@pytest.mark.parametrize("case", SPLIT_BACKWARD_CASES)
def test_triton_two_pass_backward_matches_reference(
    device, monkeypatch, float32_matmul_precision, case, dots, iterations
):
    skip_cpu_triton_beside_a_gpu(device)
    if dots == "exact" and device.type == "cuda":
        pytest.skip("full-float32 TF32 dots exist only under the interpreter")
    import fastcaps.triton_routing as triton_routing
    from fastcaps._interpreter import exact_float32_dots
    from fastcaps.triton_launch import override_routing_plan

    recorder = _LaunchRecorder(triton_routing.routing_backward_partial_kernel, "PHASE")
    monkeypatch.setattr(triton_routing, "routing_backward_partial_kernel", recorder)
    float32_matmul_precision("medium")
    shape = SPLIT_BACKWARD_CASES[case]
    u, weight, bias = make_layer_inputs(shape, torch.float32, device, bias=True)
    exact = dots == "exact"
    with (
        override_routing_plan(block_b=64, store_coefficients=True),
        exact_float32_dots() if exact else contextlib.nullcontext(),
    ):
        check_capsule_routing("triton", u, weight, bias, iterations, False, torch.float32, case,
                              None if exact else TF32_TOLERANCE)  # fmt: skip
    assert recorder.values == [1, 2] * (iterations - 1)


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
def test_two_pass_backward_only_where_it_is_modelled_faster(float32_matmul_precision):
    from fastcaps.triton_launch import TL_DTYPES, routing_plan

    def split(batch, dtype, n_out=10):
        return routing_plan(batch, 1152, n_out, 16, 8, dtype, "cpu").split_backward

    float32_matmul_precision("highest")
    assert split(128, torch.bfloat16).block_b == 64
    assert split(128, torch.bfloat16).dot_dtype == TL_DTYPES[torch.bfloat16]
    assert split(512, torch.float16) is not None
    assert split(128, torch.float32) is None  # full-precision FMA dots: one pass
    assert split(32, torch.bfloat16) is None  # 32-sample blocks: one pass is faster
    assert split(128, torch.bfloat16, n_out=100) is None  # chunked parents
    float32_matmul_precision("high")
    assert split(128, torch.float32) is None  # 3-pass TF32 models slower in two passes
    float32_matmul_precision("medium")
    assert split(128, torch.float32).precision == "tf32"


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("stored", [True, False], ids=["stored-coefficients", "recomputed"])
@pytest.mark.parametrize("setting", ["high", "medium"])
def test_pairs_kernel_takes_tf32_only_from_stored_coefficients(
    device, monkeypatch, float32_matmul_precision, setting, stored
):
    """Under "high" and "medium" the pairs kernel's dots read TF32 inputs when it reads the
    stored coefficients, and stay full float32 where it recomputes them (TF32 there spills on
    sm_90); within the float32 tolerances under "high", TF32_TOLERANCE under "medium" (the
    TF32 inputs rounded as on a GPU)."""
    skip_cpu_triton_beside_a_gpu(device)
    import fastcaps.triton_routing as triton_routing
    from fastcaps.triton_launch import override_routing_plan

    recorder = _LaunchRecorder(triton_routing.routing_backward_pairs_kernel, "PRECISION")
    monkeypatch.setattr(triton_routing, "routing_backward_pairs_kernel", recorder)
    float32_matmul_precision(setting)
    u, weight, bias = make_layer_inputs(Shape(5, 9, 10, 16, 8), torch.float32, device, bias=True)
    tolerance = None if setting == "high" else TF32_TOLERANCE
    with override_routing_plan(store_coefficients=stored, capsules_per_slice=4):
        check_capsule_routing("triton", u, weight, bias, 3, False, torch.float32, setting,
                              tolerance)  # fmt: skip
    tf32 = {"high": "tf32x3", "medium": "tf32"}[setting]
    assert recorder.values == [tf32 if stored else "ieee"]


def test_plan_keeps_tensor_core_dots_out_of_the_variants_that_spill(float32_matmul_precision):
    """The rules of routing_plan that keep the static sm_90 check spill-free (and are modelled
    faster): which kernels take the tensor cores, and with which sample blocks."""
    from fastcaps.triton_launch import (
        TL_DTYPES,
        min_dot_k,
        predictions_plan,
        routing_plan,
        stacked_capsules,
    )

    def plans(batch=128, dtype=torch.float32, n_out=10):
        layer = (batch, 1152, n_out, 16, 8, dtype, "cpu")
        return routing_plan(*layer), predictions_plan(*layer)

    float32_matmul_precision("high")
    plan, predictions = plans()
    assert plan.pairs_for(stored=True).precision == "tf32x3"
    assert plan.pairs_for(stored=False).precision == "ieee"  # recomputing u_hat
    assert (plan.backward.precision, plan.backward.block_b) == ("tf32x3", 16)  # 32 spill
    assert plan.pairs.block_b == 32
    assert plan.forward.precision == "tf32x3"
    assert predictions.pairs.precision == "tf32x3"  # reads grad u_hat: nothing recomputed
    assert plans(64)[0].forward.block_b == 16  # 32-sample tensor-core blocks spill
    chunked, _ = plans(32, n_out=100)
    assert chunked.stats.precision == "ieee" and chunked.backward.precision == "ieee"
    float32_matmul_precision("highest")
    plan, predictions = plans()
    assert {plan.pairs_for(stored=True).precision, predictions.pairs.precision} == {"ieee"}
    assert (plan.backward.precision, plan.backward.block_b) == ("ieee", 32)
    assert plans(64)[0].forward.block_b == 32  # FMA dots: no spill there
    float32_matmul_precision("medium")
    plan, _ = plans()
    assert plan.pairs_for(stored=True).precision == "tf32"
    assert plan.pairs_for(stored=False).precision == "ieee"
    bf16 = TL_DTYPES[torch.bfloat16]
    plan, predictions = plans(32, torch.bfloat16)
    assert plan.pairs_for(stored=True).dot_dtype == bf16
    assert plan.pairs_for(stored=False).dot_dtype == TL_DTYPES[torch.float32]
    assert (plan.backward.dot_dtype, plan.backward.block_b) == (bf16, 16)
    # Din is only an N of the pairs kernel's dots: padded to 8, not to the minimum K (16 for
    # half inputs), except where the recomputing kernel's u_hat dot takes it as its K
    assert (plan.backward.kp, plan.pairs_for(stored=True).kp) == (16, 8)
    assert plan.pairs_for(stored=False).kp == max(8, min_dot_k(torch.float32))
    assert predictions.pairs.kp == 8
    small = routing_plan(32, 1152, 10, 16, 3, torch.bfloat16, "cpu")
    wide = routing_plan(32, 1152, 10, 16, 12, torch.bfloat16, "cpu")
    assert (small.pairs.kp, wide.pairs.kp) == (8, 16)
    # the first forward pass stacks capsules into the K that Din leaves empty
    assert (stacked_capsules(plan.forward, 8), stacked_capsules(small.forward, 3)) == (2, 4)
    assert stacked_capsules(plans()[0].forward, 8) == min_dot_k(torch.float32) // 8
    # the pairs kernel's state tiles held across its capsules: gs_0, V_1 and gs_1, but gs_0 only
    # with TF32 dots and none in float64 (more would spill); none in the recomputing kernel
    assert (plan.pairs.held, plan.pairs_for(stored=False).held) == (2, 0)  # bfloat16
    assert plans(dtype=torch.float64)[0].pairs.held == 0
    for precision, held in (("highest", 2), ("medium", 1), ("high", 1)):
        float32_matmul_precision(precision)
        assert plans()[0].pairs.held == held, precision


# The predictions kernels share the routing kernels' tiles: capsules split across programs and
# the batch across chunks (grad W summed over them) or one chunk walking two sample blocks
# (grad W accumulated), parents in chunks of 2 (each chunk's part of
# grad u summed after), and a float32 10 x 16 layer whose 8-parent group takes the split grad u.
PREDICTION_PATHS = {
    "split-chunked": (Shape(20, 13, 3, 5, 3), torch.float64, TRITON_PATHS["split-chunked"]),
    "parent-chunks": (
        Shape(20, 13, 3, 5, 3),
        torch.float64,
        dict(parent_chunks=2, chunk_parents=2, chunks=1, block_b=16, capsules_per_slice=5),
    ),
    "f32-groups-8-2": (Shape(20, 7, 10, 16, 8), torch.float32, dict(capsules_per_slice=3)),
}


@pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
@pytest.mark.parametrize("needs", ["u+weight", "u", "weight"])
@pytest.mark.parametrize("path", PREDICTION_PATHS)
def test_triton_predictions_tiling_paths_match_reference(device, path, needs):
    skip_cpu_triton_beside_a_gpu(device)
    from fastcaps.triton_launch import override_routing_plan

    shape, dtype, overrides = PREDICTION_PATHS[path]
    names = needs.split("+")
    u, weight, _ = make_layer_inputs(shape, dtype, device, bias=False)
    u.requires_grad_("u" in names)
    weight.requires_grad_("weight" in names)
    u64, w64 = as_float64_leaf(u), as_float64_leaf(weight)
    leaves = {"u": (u, u64), "weight": (weight, w64)}
    with override_routing_plan(**overrides):
        u_hat = fastcaps.predictions(u, weight, backend="triton")
        grad = torch.randn(u_hat.shape, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64)  # fmt: skip
        got = grads(u_hat, [leaves[n][0] for n in names], grad.to(device))
    u_hat_ref = reference.predictions(u64, w64)
    assert_close(u_hat, u_hat_ref, dtype, f"{path} u_hat")
    expected = grads(u_hat_ref, [leaves[n][1] for n in names], grad)
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"{path} grad {name}")


@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
@pytest.mark.parametrize("iterations", [1, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: s.id)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_dynamic_routing_matches_reference(
    on_device, backend, dtype, shape, iterations, detach_logits
):
    device = on_device
    u, weight, bias = make_layer_inputs(shape, dtype, device, bias=True)
    u_hat = reference.predictions(u.detach(), weight.detach()).requires_grad_()
    v = fastcaps.dynamic_routing(
        u_hat, iterations, bias, detach_logits=detach_logits, backend=backend
    )
    u_hat64, bias64 = as_float64_leaf(u_hat), as_float64_leaf(bias)
    v_ref = reference.dynamic_routing(u_hat64, iterations, bias64, detach_logits=detach_logits)
    assert_close(v, v_ref, dtype, "v")
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name, g, e in zip(
        ("u_hat", "bias"),
        grads(v, (u_hat, bias), grad_v.to(device)),
        grads(v_ref, (u_hat64, bias64), grad_v),
        strict=True,
    ):
        assert_close(g, e, dtype, f"grad {name}")


@pytest.mark.parametrize("shape", [SHAPES[0], Shape(2, 4, 3, 2, 5)], ids=lambda s: s.id)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_predictions_match_reference(on_device, backend, dtype, shape):
    device = on_device
    u, weight, _ = make_layer_inputs(shape, dtype, device, bias=False)
    u_hat = fastcaps.predictions(u, weight, backend=backend)
    u64, w64 = as_float64_leaf(u), as_float64_leaf(weight)
    u_hat_ref = reference.predictions(u64, w64)
    # any strides (the torch backend returns a view of its child-major result, like einsum)
    assert u_hat.shape == u_hat_ref.shape and u_hat.dtype == dtype
    assert_close(u_hat, u_hat_ref, dtype, "u_hat")
    grad = torch.randn(u_hat.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for name, g, e in zip(
        ("u", "weight"),
        grads(u_hat, (u, weight), grad.to(device)),
        grads(u_hat_ref, (u64, w64), grad),
        strict=True,
    ):
        assert_close(g, e, dtype, f"grad {name}")


@pytest.mark.parametrize("dim", [-1, 0, 1], ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("backend,dtype", ALL)
def test_squash_matches_reference(on_device, backend, dtype, dim):
    g = torch.Generator().manual_seed(7)
    s64 = torch.randn(5, 7, 13, generator=g, dtype=torch.float64)
    s64[1, 2] = 0  # a zero vector (along the last dim)
    check_squash(backend, s64, dim, dtype, on_device)


@pytest.mark.parametrize("iterations", [1, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("backend,dtype", FULL_PRECISION)
def test_gradcheck_float64(on_device, backend, dtype, iterations):
    # numerical Jacobians: only the full-gradient mode is the true derivative (detach_logits
    # drops terms on purpose and is checked against the reference instead). fast_mode checks
    # random projections of the Jacobian, which keeps the interpreter runs short.
    g = torch.Generator().manual_seed(8)
    opts = dict(dtype=dtype, requires_grad=True)
    u = torch.randn(2, 5, 3, generator=g, **opts)
    weight = torch.randn(5, 3, 4, 3, generator=g, **opts)
    bias = torch.randn(3, 4, generator=g, **opts)
    u_hat = torch.randn(2, 5, 3, 4, generator=g, **opts)
    s = torch.randn(3, 6, generator=g, **opts)
    check = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    u, weight, bias, u_hat, s = (t.to(on_device) for t in (u, weight, bias, u_hat, s))
    assert check(
        lambda u, w, b: fastcaps.capsule_routing(u, w, iterations, b, backend=backend),
        (u, weight, bias),
    )
    assert check(
        lambda x, b: fastcaps.dynamic_routing(x, iterations, b, backend=backend), (u_hat, bias)
    )
    assert check(lambda x: fastcaps.squash(x, backend=backend), (s,))
    assert check(lambda a, b: fastcaps.predictions(a, b, backend=backend), (u, weight))


@pytest.mark.parametrize(
    "backend,dtype", backend_params([p for p in BACKEND_DTYPES if p[1] != torch.bfloat16])
)
def test_zero_vectors(on_device, backend, dtype):
    device = on_device
    shape = SHAPES[0]
    u, weight, bias = make_layer_inputs(shape, dtype, device, bias=False)
    with torch.no_grad():
        u[1] = 0  # a whole sample of zero capsules: s = 0 in every iteration
        u[2, :5] = 0  # some zero capsules
    check_capsule_routing(backend, u, weight, bias, 3, False, dtype, "zero inputs")
    zero_u = torch.zeros_like(u).requires_grad_()
    v = fastcaps.capsule_routing(zero_u, weight, 3, backend=backend)
    assert torch.equal(v, torch.zeros_like(v))
    gu, gw = torch.autograd.grad(v.sum(), (zero_u, weight))
    assert torch.isfinite(gu).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("detach_logits", [False, True], ids=["grad-all-iters", "detach"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_non_contiguous_inputs(on_device, backend, dtype, detach_logits):
    device = on_device
    shape = SHAPES[0]
    g = torch.Generator().manual_seed(10)
    # u as a transposed view, weight as a permuted view, bias as a strided slice, each taken on
    # the device (a copy to another device would make the strided slice contiguous)
    u, weight, bias = (
        t.to(device)
        for t in (
            torch.randn(shape.Nin, shape.B, shape.Din, generator=g, dtype=torch.float64),
            torch.randn(shape.Din, shape.Nout, shape.Dout, shape.Nin, generator=g,
                        dtype=torch.float64) / shape.Din**0.5,
            torch.randn(shape.Nout, 2 * shape.Dout, generator=g, dtype=torch.float64),
        )
    )  # fmt: skip
    u = u.transpose(0, 1).requires_grad_()
    weight = weight.permute(3, 1, 2, 0).requires_grad_()
    bias = bias[:, ::2].requires_grad_()
    assert not u.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    check_capsule_routing(backend, u, weight, bias, 3, detach_logits, dtype, "non-contiguous")
    u_hat = (
        reference.predictions(u.detach(), weight.detach())
        .transpose(1, 2)
        .contiguous()
        .transpose(1, 2)
    )
    assert not u_hat.is_contiguous()
    torch.testing.assert_close(
        fastcaps.dynamic_routing(u_hat, 3, bias.detach(), backend=backend),
        reference.dynamic_routing(u_hat, 3, bias.detach()),
    )
    torch.testing.assert_close(
        fastcaps.predictions(u, weight, backend=backend), reference.predictions(u, weight)
    )


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_empty_batch(on_device, backend, dtype):
    device = on_device
    shape = Shape(0, 6, 3, 4, 2)
    u, weight, bias = make_layer_inputs(shape, dtype, device, bias=True)
    v = fastcaps.capsule_routing(u, weight, 3, bias, backend=backend)
    assert v.shape == (0, 3, 4)
    gu, gw, gb = torch.autograd.grad(v.sum(), (u, weight, bias))
    assert (
        gu.shape == u.shape
        and torch.equal(gw, torch.zeros_like(gw))
        and torch.equal(gb, torch.zeros_like(gb))
    )
    u_hat = torch.zeros(0, 6, 3, 4, dtype=dtype, device=device, requires_grad=True)
    v = fastcaps.dynamic_routing(u_hat, 2, backend=backend)
    assert v.shape == (0, 3, 4)
    (g,) = torch.autograd.grad(v.sum(), (u_hat,))
    assert g.shape == u_hat.shape
    assert fastcaps.predictions(u, weight, backend=backend).shape == (0, 6, 3, 4)


def test_capsule_routing_saves_nothing_of_u_hat_size():
    shape = Shape(8, 40, 6, 8, 4)
    u, weight, bias = make_layer_inputs(shape, torch.float32, "cpu", bias=True)
    v, state = saved_state(
        lambda: fastcaps.capsule_routing(u, weight, 3, bias, backend="torch"), (u, weight, bias)
    )
    # besides its inputs, the per-iteration sums s [R, B, Nout, Dout] and the coefficients of
    # iterations 1 .. R-1 [R - 1, B, Nout, Nin]: nothing with both Nin and Dout
    assert [tuple(t.shape) for t in state] == [
        (3, shape.B, shape.Nout, shape.Dout),
        (2, shape.B, shape.Nout, shape.Nin),
    ]
    v.sum().backward()  # the graph still works with only those tensors
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_tolerance_table_covers_tested_dtypes():
    assert {dtype for _, dtype in BACKEND_DTYPES} <= set(TOLERANCES)


@pytest.mark.skipif(
    not (CUDA and TRITON),
    reason="needs a GPU with triton: u_hat passes 2^31 elements (8.6 GB in float32) at B = 11,700 "
    "on the MNIST shape, far beyond what the interpreter can run",
)
def test_triton_offsets_past_int32():
    shape = Shape(11_700, 1152, 10, 16, 8)
    assert shape.B * shape.Nin * shape.Nout * shape.Dout > 2**31
    u, weight, _ = make_layer_inputs(shape, torch.float32, "cuda", bias=False)
    last = slice(shape.B - 3, shape.B)  # the samples whose offsets need int64
    with torch.no_grad():
        u_hat_tail = fastcaps.predictions(u, weight, backend="triton")[last]
        torch.testing.assert_close(u_hat_tail, reference.predictions(u[last], weight))
        del u_hat_tail
    v = fastcaps.capsule_routing(u, weight, 3, backend="triton")
    grad_v = torch.zeros_like(v)
    grad_v[last] = torch.randn_like(v[last])
    (grad_u,) = torch.autograd.grad(v, (u,), grad_v)
    u_tail = u.detach()[last].requires_grad_()
    v_tail = fastcaps.capsule_routing(u_tail, weight, 3, backend="torch")
    (grad_u_tail,) = torch.autograd.grad(v_tail, (u_tail,), grad_v[last])
    torch.testing.assert_close(v[last], v_tail, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_u[last], grad_u_tail, atol=2e-5, rtol=1e-4)


def test_without_triton_auto_runs_torch_and_triton_says_how_to_install(monkeypatch):
    from fastcaps import backend as dispatch

    monkeypatch.setitem(dispatch._TRITON_STATE, "available", False)
    s = torch.randn(3, 4, 5)
    torch.testing.assert_close(fastcaps.squash(s, backend="auto"), reference.squash(s))
    with pytest.raises(
        RuntimeError, match=r"triton is not installed; pip install 'fastcaps\[triton\]'"
    ):
        fastcaps.squash(s, backend="triton")


@pytest.mark.parametrize("in_place", [True, False], ids=["grad-in-place", "grad-one-bmm"])
@pytest.mark.parametrize("budget", [1, 3400, None], ids=["4-samples", "5-samples", "default"])
@pytest.mark.parametrize("batch", [0, 1, 9], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("op", ["dynamic_routing", "capsule_routing"])
def test_torch_backend_chunks_of_the_batch_change_nothing(
    chunk_budget, monkeypatch, op, batch, budget, in_place
):
    """Every chunking gives the reference's value and gradients, with grad u_hat formed either
    way (in place term by term, as on a CPU, or as one bmm, as on CUDA)."""
    from fastcaps import torch_backend

    monkeypatch.setattr(torch_backend, "accumulates_in_place", lambda device: in_place)
    # 3400 bytes: 5 samples of 7 x 3 x 8 float32 prediction vectors; 1 byte: the minimum, 4
    chunk_budget(budget)
    chunks = torch_backend.batch_chunks(9, 7 * 3 * 8 * 4, torch.device("cpu"))
    assert [end - start for start, end in chunks] == {1: [4, 4, 1], 3400: [5, 4], None: [9]}[budget]
    g = torch.Generator().manual_seed(batch)
    u = torch.randn(batch, 7, 5, generator=g, requires_grad=True)
    weight = torch.randn(7, 3, 8, 5, generator=g, requires_grad=True)
    bias = torch.randn(3, 8, generator=g, requires_grad=True)
    if op == "capsule_routing":
        inputs = (u, weight, bias)
        run = lambda impl, *t: impl.capsule_routing(*t[:2], 3, t[2])  # noqa: E731
    else:
        inputs = (reference.predictions(u, weight).detach().requires_grad_(), bias)
        run = lambda impl, *t: impl.dynamic_routing(t[0], 3, t[1])  # noqa: E731
    v = run(torch_backend, *inputs)
    wide = [as_float64_leaf(t) for t in inputs]
    v_ref = run(reference, *wide)
    grad = torch.randn(v.shape, generator=g)
    got = torch.autograd.grad(v, inputs, grad)
    expected = torch.autograd.grad(v_ref, wide, grad.double())
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(v.double(), v_ref, atol=atol, rtol=rtol)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


def test_chunk_buffer_is_one_allocation_shared_by_the_chunks():
    from fastcaps.torch_backend import ChunkBuffer

    like = torch.empty(0)
    shared = ChunkBuffer([(0, 5), (5, 9)], per_sample=6, like=like, dtype=torch.float64)
    first, last = shared.take((5, 6)), shared.take((4, 3, 2))
    assert first.dtype == torch.float64 and first.is_contiguous() and last.is_contiguous()
    assert first.data_ptr() == last.data_ptr() == shared.flat.data_ptr()
    assert shared.flat.numel() == 30  # the largest chunk, 5 samples of 6 values
    assert ChunkBuffer([(0, 9)], per_sample=6, like=like, dtype=torch.float64).take((9, 6)) is None


def test_chunk_budget_errors_name_the_setting(monkeypatch):
    from fastcaps import torch_backend

    monkeypatch.setenv("FASTCAPS_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match=r"\$FASTCAPS_CHUNK_BYTES must be a number of bytes"):
        torch_backend.set_chunk_bytes(None)
    with pytest.raises(ValueError, match=r"budget must be a number of bytes >= 1 or None, got 0"):
        torch_backend.set_chunk_bytes(0)


def test_plans_are_cached_per_layer_precision_and_override(float32_matmul_precision):
    """One plan object per (layer, device, float32 matmul precision, override): made once, and
    never served for another setting."""
    from fastcaps.triton_launch import override_routing_plan, predictions_plan, routing_plan

    layer = (128, 1152, 10, 16, 8, torch.float32, "cpu")
    float32_matmul_precision("highest")
    plan = routing_plan(*layer)
    assert routing_plan(*layer) is plan
    assert predictions_plan(*layer) is predictions_plan(*layer)
    with override_routing_plan(block_b=16):
        assert routing_plan(*layer).forward.block_b == 16 != plan.forward.block_b
    assert routing_plan(*layer) is plan
    float32_matmul_precision("high")
    assert routing_plan(*layer).forward.precision == "tf32x3" != plan.forward.precision
