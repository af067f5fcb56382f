"""The static sm_90 (H100) cost report: every Triton kernel that fastcaps' ops really launch,
compiled for an H100 and modelled, beside a model of the torch backend. No GPU needed.

    python -m benchmarks.gpu_static                      # report: benchmarks/results/static-sm90/
    python -m benchmarks.gpu_static --check              # also float16/float64; exit 1 on spills
    python -m benchmarks.gpu_static --measure            # on a GPU: time every kernel, add it
    python -m benchmarks.gpu_static --baseline OLD.json  # a before/after column
    python -m benchmarks.gpu_static --fastcaps-from /tmp/old --out DIR   # model another checkout
    python -m benchmarks.gpu_static --render DIR/report.json --out DIR   # rewrite, no compiling

Each op runs forward and backward on CPU tensors while ``benchmarks.static_sm90`` intercepts the
Triton launches and compiles them for sm_90 through the JIT's own binder, so the variants in the
report are exactly the ones a GPU would run. The torch backend runs on the meta device while a
dispatch mode records its ATen ops, which are modelled from their bytes and FLOPs. All times here
are a model (see ``benchmarks.static_sm90``); ``--measure`` puts real times beside them. The
summary also gives a latency-aware total (``latency_aware_us``): each launch at the largest of its
issue time, memory time and a latency term fitted to the one GPU measurement so far.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "static-sm90"


@dataclass(frozen=True)
class Layer:
    name: str
    B: int
    Nin: int
    Nout: int
    Dout: int = 16
    Din: int = 8
    R: int = 3

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-I{self.Nin}-J{self.Nout}-D{self.Dout}-K{self.Din}-R{self.R}"


def mnist(batch: int) -> Layer:
    return Layer("mnist", batch, 1152, 10)


REPORT_LAYERS = [
    mnist(32),
    mnist(128),
    mnist(512),
    mnist(2048),
    Layer("cifar", 128, 2048, 10),
    Layer("classes100", 32, 1152, 100),
    Layer("classes100", 128, 1152, 100),
]
CLASSES100 = Layer("classes100", 32, 1152, 100)
CHECK_LAYERS = [mnist(32), mnist(128), Layer("cifar", 128, 2048, 10), CLASSES100]
MNIST_R6 = Layer("mnist", 32, 1152, 10, R=6)  # more iterations than stored coefficients allow
OPS = ("capsule_routing", "dynamic_routing", "predictions", "squash", "exp_squash",
       "attention_routing", "capsule_attention_routing")  # fmt: skip
# fastcaps.backend.ATTENTION_ROUTING_OPS, spelled out so that this module imports torch lazily
# (tests/test_gpu_static.py checks the two agree)
ATTENTION_ROUTING_OPS = ("attention_routing", "capsule_attention_routing")
# Efficient-CapsNet's routing layer (16 primary capsules of 8D -> 10 x 16D; R unused)
EFFICIENT = Layer("efficient", 128, 16, 10)


# ----------------------------------------------------------------------------------------------
# loop trip counts of every kernel, per source loop in pre-order (see static_sm90.match_loops)
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _per_slice(a: dict) -> float:
    """Average capsules per program of the slices (the last slice may be shorter)."""
    return a["n_in"] / _cdiv(a["n_in"], a["capsules_per_slice"])


def _blocks_per_chunk(a: dict) -> int:
    """Sample blocks a program of a batch-chunked kernel walks."""
    return _cdiv(_cdiv(a["batch"], a["BLOCK_B"]), a["chunks"])


def _pairs_trips(a: dict) -> list[float]:
    blocks = _blocks_per_chunk(a)
    if a["LAST_ONLY"]:
        # the zero-fill loop runs only in slice 0 programs: count its average per program
        slices = _cdiv(a["n_in"], a["capsules_per_slice"])
        return [blocks, (a["iterations"] - 1) / slices, _per_slice(a)]
    # HELD = 2: iteration 1's term is formed outside the iterations' loop
    held = 1 if a["STORED_COEFFICIENTS"] and a.get("HELD", 0) >= 2 else 0
    return [blocks, _per_slice(a), max(a["iterations"] - 1 - held, 0)]


def _grad_weight_trips(a: dict) -> list[float]:
    return [a["samples_per_chunk"]] * a["DIN"]


def _legacy_pairs_trips(a: dict) -> list[float]:
    """The pairs kernels of commit 181097f: a loop over the iterations (the u_hat source), or
    over the chunk's samples and then the iterations (the fused layer)."""
    steps = 1 if a["DETACH_LOGITS"] else a["iterations"]
    if "samples_per_chunk" in a:
        return [a["samples_per_chunk"], steps]
    return [steps]


LOOP_TRIPS = {
    "routing_forward_partial_kernel": lambda a: (
        [_per_slice(a) / a["STACKED"]] if a.get("STACKED", 0) > 1 else [_per_slice(a)]
    ),
    "routing_backward_partial_kernel": lambda a: [_per_slice(a)],
    "routing_forward_combine_kernel": lambda a: [a["slices"] - 1],
    "routing_backward_combine_kernel": lambda a: [a["slices"] - 1],
    "routing_backward_pairs_kernel": lambda a: (
        _pairs_trips(a) if "LAST_ONLY" in a else _legacy_pairs_trips(a)
    ),
    "routing_softmax_stats_kernel": lambda a: [_per_slice(a), a["parent_chunks"]],
    "routing_output_grad_kernel": lambda a: [a["iterations"] - 1] if a["DETACHED"] else [],
    # the capsule loop; the predictions forward kernel of commit 181097f has no loop
    "predictions_forward_kernel": lambda a: [_per_slice(a)] if "capsules_per_slice" in a else [],
    "predictions_backward_kernel": lambda a: [_blocks_per_chunk(a), _per_slice(a)],
    "predictions_grad_input_kernel": lambda a: [],
    "predictions_grad_weight_kernel": _grad_weight_trips,
    "squash_forward_kernel": lambda a: [],
    "squash_backward_kernel": lambda a: [],
    # the kernels of commit 181097f, before the redesign, so that ``--fastcaps-from`` can model
    # that commit for the report's "before" column
    "routing_forward_kernel": lambda a: [a["iterations"], _cdiv(a["n_in"], a["BLOCK_I"])],
    "routing_backward_state_kernel": lambda a: [
        1 if a["DETACH_LOGITS"] else a["iterations"],
        _cdiv(a["n_in"], a["BLOCK_I"]),
    ],
    "capsule_routing_backward_pairs_kernel": _legacy_pairs_trips,
}


# ----------------------------------------------------------------------------------------------
# running the ops
# ----------------------------------------------------------------------------------------------


def _inputs(op: str, layer: Layer, dtype, device: str, bias: bool = False):
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(layer.B, layer.Nin, layer.Din, generator=g) / 3
    weight = 0.05 * torch.randn(layer.Nin, layer.Nout, layer.Dout, layer.Din, generator=g)
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    if op in ("squash", "exp_squash"):
        return (leaf(u),)
    if op == "predictions":
        return leaf(u), leaf(weight)
    if op in ATTENTION_ROUTING_OPS:
        prior = leaf(0.1 * torch.randn(layer.Nin, layer.Nout, generator=g))
        if op == "attention_routing":
            return leaf(torch.einsum("bik,ijdk->bijd", u, weight)), prior
        return leaf(u), leaf(weight), prior
    if op == "dynamic_routing":
        u_hat = torch.einsum("bik,ijdk->bijd", u, weight)
        extra = (leaf(0.1 * torch.randn(layer.Nout, layer.Dout, generator=g)),) if bias else ()
        return (leaf(u_hat), *extra)
    return (
        leaf(u),
        leaf(weight),
        *((leaf(0.1 * torch.randn(layer.Nout, layer.Dout, generator=g)),) if bias else ()),
    )


def _call(op: str, implementation, args, layer: Layer, detach_logits: bool = False):
    if op in ("squash", "exp_squash"):
        return implementation(args[0])
    if op in ("predictions", *ATTENTION_ROUTING_OPS):
        return implementation(*args)
    bias = args[-1] if len(args) == (3 if op == "capsule_routing" else 2) else None
    tensors = args[:2] if op == "capsule_routing" else args[:1]
    return implementation(*tensors, layer.R, bias, detach_logits=detach_logits)


def triton_launches(
    op: str,
    layer: Layer,
    dtype,
    bias: bool = False,
    detach_logits: bool = False,
    float32_precision: str | None = None,
):
    """The intercepted launches of one forward and one backward of ``op`` on the Triton backend,
    tagged with their phase (``float32_precision``: a torch.set_float32_matmul_precision
    setting for the duration)."""
    import torch

    from benchmarks.static_sm90 import intercept_launches
    from fastcaps.backend import _TRITON_OPS, load_triton_ops

    load_triton_ops()
    args = _inputs(op, layer, dtype, "cpu", bias)
    tags = {"phase": "forward"}
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(float32_precision or previous)
    try:
        with intercept_launches(tags) as launches:
            out = _call(op, _TRITON_OPS[op], args, layer, detach_logits)
            tags["phase"] = "backward"
            torch.autograd.grad(out, args, torch.ones_like(out))
    finally:
        torch.set_float32_matmul_precision(previous)
    return launches


# ----------------------------------------------------------------------------------------------
# the torch backend, modelled from its ATen ops
# ----------------------------------------------------------------------------------------------

NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
    "lift_fresh", "alias", "_unsafe_view", "view", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select", "slice", "as_strided", "unbind", "split", "narrow",
}  # fmt: skip
# allocations that only write their output (``new_zeros``'s tensor argument is not read)
FILL_ONLY = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "zero_",
             "fill_", "zeros", "ones", "full"}  # fmt: skip
MATMUL = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}
# cuBLAS float32 GEMM (no TF32: torch's default) at 70% of the H100's 67 TFLOPS
TORCH_MATMUL_FLOPS = 0.7 * 67e12


@dataclass
class AtenOp:
    name: str
    phase: str
    bytes: int
    flops: float
    time_s: float


def torch_backend_ops(op: str, layer: Layer, dtype) -> list[AtenOp]:
    """The kernels the torch backend launches for one forward and backward of ``op``, each
    modelled as max(FLOPs at cuBLAS speed, bytes at HBM speed) + launch overhead."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.static_sm90 import HOPPER
    from fastcaps import torch_backend
    from fastcaps.backend import _torch_op

    def nbytes(x) -> int:
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

    ops: list[AtenOp] = []
    phase = {"name": "forward"}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.is_view or name in NO_KERNEL:
                return out
            flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
            flat_out = torch.utils._pytree.tree_leaves(out)
            moved = sum(nbytes(x) for x in flat_out)
            if name not in FILL_ONLY:
                moved += sum(nbytes(x) for x in flat_in)
            flops = 0.0
            if name in MATMUL:
                operands = [x for x in args if isinstance(x, torch.Tensor)]
                first = 1 if name in ("baddbmm", "addmm", "addbmm") else 0
                a, b = operands[first : first + 2]
                flops = 2.0 * math.prod(a.shape) * b.shape[-1]
            time_s = max(flops / TORCH_MATMUL_FLOPS, moved / HOPPER.dram_bytes_per_s)
            ops.append(AtenOp(name, phase["name"], moved, flops, time_s + HOPPER.launch_s))
            return out

    args = _inputs(op, layer, dtype, "meta")
    # Meta tensors are not CUDA tensors, so the backend would take its CPU paths (chunks of the
    # batch, grad u_hat term by term); what is modelled is what it does on CUDA.
    budget, in_place = torch_backend.get_chunk_bytes(), torch_backend.accumulates_in_place
    torch_backend.set_chunk_bytes(1 << 62)
    torch_backend.accumulates_in_place = lambda device: False
    try:
        with Recorder():
            out = _call(op, _torch_op(op), args, layer)
            phase["name"] = "backward"
            torch.autograd.grad(out, args, torch.ones_like(out))
    finally:
        torch_backend.set_chunk_bytes(budget)
        torch_backend.accumulates_in_place = in_place
    return ops


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------


def model_scenario(op: str, layer: Layer, dtype_name: str, **options) -> dict:
    """Every launch of the Triton backend for one op, layer and dtype, modelled."""
    import torch

    from benchmarks.static_sm90 import analyse, model_launch

    dtype = getattr(torch, dtype_name)
    rows = []
    launches = triton_launches(op, layer, dtype, **options)
    variants = {launch.variant: launch.compiled for launch in launches}
    with ThreadPoolExecutor(max_workers=4) as pool:  # the analysis waits on external tools
        analyses = dict(zip(variants, pool.map(analyse, variants.values()), strict=True))
    for launch in launches:
        analysis = analyses[launch.variant]
        trips = LOOP_TRIPS[launch.kernel](launch.scalars) if launch.kernel in LOOP_TRIPS else None
        m = model_launch(launch, analysis, trips)
        mix = m.dynamic_per_program
        rows.append(
            {
                "kernel": launch.kernel,
                "phase": launch.tags["phase"],
                "variant": hashlib.sha1(launch.variant.encode()).hexdigest()[:12],
                "constexprs": {k: v for k, v in launch.scalars.items() if k.isupper()},
                "grid": list(m.grid),
                "programs": m.programs,
                "num_warps": m.num_warps,
                "registers": m.registers,
                "spills": m.spills,
                "local_bytes": m.local_bytes,
                "shared_bytes": m.shared_bytes,
                "blocks_per_sm": m.blocks_per_sm,
                "waves": m.waves,
                "loops": len(analysis.loops),
                "loops_matched": m.loops_matched,
                "trips": m.trips,
                "static_instructions": m.static_instructions,
                "static_mix": analysis.static_mix(),
                "dynamic_per_program": mix,
                "tensor_instructions": sum(
                    v for k, v in mix.items() if k in ("HMMA", "HGMMA", "DMMA", "IMMA")
                ),
                "issue_us": m.issue_s * 1e6,
                "memory_us": m.memory_s * 1e6,
                "launch_us": m.launch_s * 1e6,
                "time_us": m.time_s * 1e6,
                "bound": m.bound,
                "tensor_bytes": m.tensor_bytes,
            }
        )
    return {
        "op": op,
        "layer": asdict(layer) | {"id": layer.id},
        "dtype": dtype_name,
        "provider": "triton",
        "options": options,
        "launches": rows,
        "forward_us": sum(r["time_us"] for r in rows if r["phase"] == "forward"),
        "backward_us": sum(r["time_us"] for r in rows if r["phase"] == "backward"),
    }


def model_torch_scenario(op: str, layer: Layer, dtype_name: str) -> dict:
    import torch

    ops = torch_backend_ops(op, layer, getattr(torch, dtype_name))
    return {
        "op": op,
        "layer": asdict(layer) | {"id": layer.id},
        "dtype": dtype_name,
        "provider": "torch",
        "options": {},
        "launches": [asdict(o) | {"time_us": o.time_s * 1e6} for o in ops],
        "forward_us": sum(o.time_s for o in ops if o.phase == "forward") * 1e6,
        "backward_us": sum(o.time_s for o in ops if o.phase == "backward") * 1e6,
    }


def _total(s: dict) -> float:
    return s["forward_us"] + s["backward_us"]


# Cycles a warp takes per instruction when no other warp hides its latency, fitted to the H200
# lease of 2026-11-28 (in-sample: the 489 Triton launches it measured; 7 minimises the mean
# |log(measured / estimate)|, 0.63 with the issue/memory model alone, 0.33 with this term).
WARP_CYCLES_PER_INSTRUCTION = 7.0


def latency_us(launch: dict, model: dict) -> float:
    """A launch's time if each warp's instructions ran back to back at
    WARP_CYCLES_PER_INSTRUCTION cycles, no other warp hiding the latency: each SM runs its
    ``ceil(programs / SMs)`` programs in rounds of the blocks resident at once, each round one
    warp's instruction count long."""
    from benchmarks.static_sm90 import programs_per_sm

    per_warp = sum(launch["dynamic_per_program"].values()) / launch["num_warps"]
    per_sm, resident = programs_per_sm(launch["programs"], launch["blocks_per_sm"], model["sms"])
    rounds = math.ceil(per_sm / resident) if per_sm else 0
    return rounds * per_warp * WARP_CYCLES_PER_INSTRUCTION / model["clock_hz"] * 1e6


def latency_aware_us(scenario: dict, model: dict) -> float:
    """A scenario's forward + backward with each launch at max(issue, memory, latency) plus its
    launch overhead: the model with the latency term the H200 lease showed it lacks."""
    return sum(max(r["issue_us"], r["memory_us"], latency_us(r, model)) + r["launch_us"]
               for r in scenario["launches"])  # fmt: skip


def ffma_floor_us(scenario: dict, model: dict) -> float:
    """The time a scenario's Triton launches would take if they issued nothing but their FFMAs,
    spread evenly over every SM's FP32 pipe (HOPPER's ``fp32`` rate): no launch overhead, no
    memory, no other instruction. A lower bound of the float32 FMA-unit kernels' model, and
    what their other instructions cost beside it."""
    rate = dict(model["pipe_rates"])["fp32"] * model["sms"] * model["clock_hz"]
    ffma = sum(r["dynamic_per_program"].get("FFMA", 0) * r["programs"]
               for r in scenario["launches"])  # fmt: skip
    return ffma / rate * 1e6


# Spills that Triton 3.6 (the lent H100's toolchain) makes and 3.9 does not, tolerated up to
# these bytes per (dtype, kernel): the float32 forward partial kernel at 64 samples per program
# (40 B; 32 samples per program is modelled slower, MNIST B=128 forward 104.6 -> 120.0 us, spills
# 8 B in the first pass and makes bfloat16 spill 216-240 B; fewer or more pipeline stages spill
# more) and the predictions backward with chunked parents (100 classes B=32: 8 B with Din padded
# to 8, an N of its dots; padded to 16, 3.6's minimum K, it is spill-free but modelled 223.6 ->
# 336.0 us). Triton 3.6 spills in float64 variants as well (tests only).
TRITON_36_SPILLS = {
    ("float32", "routing_forward_partial_kernel"): 40,
    ("float32", "predictions_backward_kernel"): 8,
}
# and under the 3-pass TF32 opt-in (`"high"`), whose TF32 operand splits take more registers:
# MNIST B=128, self-attention routing's backward partial kernel (16 B; modelled forward +
# backward 276.7 -> 193.7 us against full-float32 dots) and the predictions backward (32 B; 168.8
# -> 99.9 us)
TRITON_36_HIGH_SPILLS = {
    ("float32", "routing_backward_partial_kernel"): 16,
    ("float32", "predictions_backward_kernel"): 32,
}
# and the pairs kernel that recomputes u_hat and the coefficients (more than 5 iterations at
# Dout = 16, detached logits) in float32 at 16-sample blocks (MNIST B=32, 6 iterations: 168 B;
# with 8 warps it is spill-free but modelled slower, 87.6 -> 105.6 us)
TRITON_36_RECOMPUTING_PAIRS_SPILL = 168


def _triton_before(version: str, major: int, minor: int) -> bool:
    parts = [int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit()]
    return len(parts) == 2 and tuple(parts) < (major, minor)


def spill_tolerated(scenario: dict, launch: dict, triton_version: str) -> bool:
    """Whether a spill of ``launch`` is marked in report.md but not failed. float64 is for tests
    only; its self-attention backward (one more input, the prior, than dynamic routing) sits at
    the 255-register ceiling of 8-warp blocks and spills a few bytes (on Triton 3.9: 112 B in the
    fused layer's backward partial kernel, 8 B in the pairs kernel on a stored u_hat). Under
    Triton 3.6, every float64 spill and those of ``TRITON_36_SPILLS`` (under ``"high"``, also
    ``TRITON_36_HIGH_SPILLS``; the recomputing float32 pairs kernel's,
    ``TRITON_36_RECOMPUTING_PAIRS_SPILL``). Every other spill is a problem."""
    dtype = scenario["dtype"]
    if dtype == "float64" and scenario["op"] in ATTENTION_ROUTING_OPS:
        return True
    if _triton_before(triton_version, 3, 7):
        key = (dtype, launch["kernel"])
        allowed = TRITON_36_SPILLS.get(key, 0)
        if scenario.get("options", {}).get("float32_precision") == "high":
            allowed = max(allowed, TRITON_36_HIGH_SPILLS.get(key, 0))
        recomputing = launch.get("constexprs", {}).get("STORED_COEFFICIENTS") is False
        if key == ("float32", "routing_backward_pairs_kernel") and recomputing:
            allowed = max(allowed, TRITON_36_RECOMPUTING_PAIRS_SPILL)
        return dtype == "float64" or launch["local_bytes"] <= allowed
    return False


def problems(
    scenarios: list[dict], triton_version: str, tolerated: list[str] | None = None
) -> list[str]:
    """What the checks object to: spills (but for ``spill_tolerated``, which are appended to
    ``tolerated`` when given), unmatched loops, no tensor-core instruction in a half-precision
    routing kernel, and kernels over 10 us with under one wave at B = 32."""
    found = []
    for s in scenarios:
        if s["provider"] != "triton":
            continue
        where = f"{s['op']} {s['layer']['id']} {s['dtype']}"
        for r in s["launches"]:
            if r["spills"] and spill_tolerated(s, r, triton_version):
                if tolerated is not None:
                    tolerated.append(f"{where}: {r['kernel']} spills {r['local_bytes']} B")
            elif r["spills"]:
                found.append(f"{where}: {r['kernel']} spills ({r['local_bytes']} B local memory)")
            # float64 is for tests only: its timing model may stay unmatched (ptxas versions
            # some of its loops); its spills may not, but for spill_tolerated
            if not r["loops_matched"] and s["dtype"] != "float64":
                found.append(f"{where}: {r['kernel']}: {r['loops']} SASS loops, trips {r['trips']}")
            half = s["dtype"] in ("bfloat16", "float16")
            # the fused layer's forward forms u_hat on the tensor cores for half inputs
            on_tensor_cores = r["kernel"] == "routing_forward_partial_kernel"
            if (
                half
                and on_tensor_cores
                and r["constexprs"].get("FROM_WEIGHT")
                and not r["tensor_instructions"]
            ):
                found.append(f"{where}: {r['kernel']} has no tensor-core instruction")
            # at least one wave at B = 32 for kernels over 10 us (float64 is for tests only)
            fast_dtype = s["dtype"] != "float64"
            if fast_dtype and s["layer"]["B"] == 32 and r["time_us"] > 10 and r["programs"] < 132:
                found.append(f"{where}: {r['kernel']} runs {r['programs']} programs (< 1 wave)")
    return found


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def baseline_columns(path: Path) -> dict:
    """The totals of an earlier report.json, for the "before" columns (its measured totals
    too, when it was measured)."""
    keep = ("op", "layer", "dtype", "provider", "forward_us", "backward_us")
    earlier = json.loads(path.read_text())
    measured = earlier.get("measured", {})
    rows = []
    for b in earlier["scenarios"]:
        row = {k: b[k] for k in keep}
        got = measured.get(f"{b['op']}|{b['layer']['id']}|{b['dtype']}")
        if b["provider"] == "triton" and not b.get("options") and got:
            row["measured_us"] = sum(got)
        rows.append(row)
    return {"baseline_source": str(path), "baseline": rows}


def write_report(data: dict, out: Path) -> Path:
    lines = [
        "# Static sm_90 (H100) cost report",
        "",
        "**Every time in this report is modelled, not measured** (unless a column says "
        "measured): the Triton kernels fastcaps launches were compiled for sm_90 without a GPU "
        "and their SASS read by `benchmarks/static_sm90.py`; the torch backend's ATen ops are "
        "modelled from their bytes and FLOPs. Regenerate with `python -m benchmarks.gpu_static`.",
        "",
        f"Toolchain: torch {data['torch']}, triton {data['triton']}. Model constants: "
        + ", ".join(f"{k} {v}" for k, v in data["model"].items() if not isinstance(v, list))
        + ".",
        "",
        "Model: per launch `max(issue, memory) + launch overhead`. Issue time counts every SASS "
        "instruction times the trip counts of its loops, per warp, times the warps of a program, "
        "through the busiest of the SM's pipes (or its 4 dispatch slots); the busiest SM runs "
        "`ceil(programs / 132)` programs, at reduced issue rate below 2 resident warps per "
        "scheduler. Memory time is the bytes of the tensors a launch touches, once, at HBM3 "
        "speed. The torch backend: each ATen kernel as max(FLOPs at cuBLAS float32 speed, bytes "
        "at HBM speed) + launch overhead. Per kernel, `warp-inst/program` and `loads/SHFL` "
        "(global and shared-memory loads, ldmatrix included; shuffles) count the warp "
        "instructions one program executes. `FFMA-only us` (summary) is the time the launches "
        "would take if they issued only their FFMAs, spread evenly over every SM's FP32 pipe, "
        "without launch overhead or memory: a floor for kernels whose dots run on the FMA units.",
        "",
    ]
    scenarios = data["scenarios"]
    baseline = {(b["op"], b["layer"]["id"], b["dtype"], b["provider"]): b
                for b in data.get("baseline", [])}  # fmt: skip
    measured = data.get("measured", {})
    measured_before = any("measured_us" in b for b in baseline.values())
    lines += ["## Summary (forward + backward)", ""]
    if measured:
        lines += [
            f"Measured on {data.get('measured_on', 'a GPU')}: the mean CUDA time of the Triton "
            "launches (torch.profiler), beside their model.",
            "",
        ]
    head = ("| op | layer | dtype | triton us | latency-aware us | FFMA-only us | torch us "
            "| torch / triton |")  # fmt: skip
    sep = "|---|---|---|---|---|---|---|---|"
    if baseline:
        head += " triton before us | before / after |"
        sep += "---|---|"
    if measured:
        head += " measured us | measured / model | measured / latency-aware |"
        sep += "---|---|---|"
    if measured_before:
        head += " measured before us | measured before / after |"
        sep += "---|---|"
    lines += [head, sep]
    by_key = {(s["op"], s["layer"]["id"], s["dtype"], s["provider"]): s
              for s in scenarios if not s["options"]}  # fmt: skip
    for (op, layer_id, dtype, provider), s in by_key.items():
        if provider != "triton" or s.get("options"):
            continue
        t = by_key.get((op, layer_id, dtype, "torch"))
        aware = latency_aware_us(s, data["model"])
        row = f"| {op} | {layer_id} | {dtype} | {_fmt(_total(s))} | {_fmt(aware)} | "
        row += f"{_fmt(ffma_floor_us(s, data['model']))} | "
        row += f"{_fmt(_total(t))} | {_total(t) / _total(s):.2f}x |" if t else " | |"
        b = baseline.get((op, layer_id, dtype, provider))
        if baseline:
            row += f" {_fmt(_total(b))} | {_total(b) / _total(s):.1f}x |" if b else " | |"
        got = sum(measured.get(f"{op}|{layer_id}|{dtype}", [])) or None
        if measured:
            versus_aware = f"{got / aware:.2f}x" if got and aware else ""
            row += f" {_fmt(got)} | {got / _total(s):.2f}x | {versus_aware} |" if got else " | | |"
        if measured_before:
            earlier = b.get("measured_us") if b else None
            row += f" {_fmt(earlier)} | {earlier / got:.1f}x |" if earlier and got else " | |"
        lines.append(row)
    opt_ins = [t for t in scenarios if t["options"].get("float32_precision")]
    if opt_ins:
        lines += [
            "",
            "## Float32 dots on the tensor cores (opt-in, `torch.set_float32_matmul_precision`)",
            "",
            '| op | layer | setting | triton us | default ("highest") us | default / opt-in |',
            "|---|---|---|---|---|---|",
        ]
        for t in opt_ins:
            base = by_key.get((t["op"], t["layer"]["id"], t["dtype"], "triton"))
            row = f"| {t['op']} | {t['layer']['id']} | {t['options']['float32_precision']} "
            row += f"| {_fmt(_total(t))} | "
            row += f"{_fmt(_total(base))} | {_total(base) / _total(t):.2f}x |" if base else " | |"
            lines.append(row)
    lines += ["", "## Every launched kernel", ""]
    for s in scenarios:
        if s["provider"] != "triton":
            continue
        key = f"{s['op']}|{s['layer']['id']}|{s['dtype']}"
        opts = ", ".join(f"{k}={v}" for k, v in s["options"].items())
        opts = f" ({opts})" if opts else ""
        lines += [
            f"### {s['op']} {s['layer']['id']} {s['dtype']}{opts}: "
            f"{_fmt(s['forward_us'])} us forward, {_fmt(s['backward_us'])} us backward",
            "",
            "| # | kernel | phase | programs | warps | regs | spills | smem KiB | blocks/SM "
            "| waves | SASS | warp-inst/program | FFMA | tensor | loads/SHFL | issue us "
            "| memory us | latency us | model us | bound |"
            + (" measured us |" if key in measured else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            + ("---|" if key in measured else ""),
        ]
        for i, r in enumerate(s["launches"]):
            mix = r["dynamic_per_program"]
            total = sum(mix.values())
            ffma = mix.get("FFMA", 0) / total if total else 0
            mem = sum(v for k, v in mix.items() if k.startswith(("LDG", "LDS", "LDSM")))
            shfl = mix.get("SHFL", 0)
            row = (
                f"| {i} | {r['kernel'].removesuffix('_kernel')} | {r['phase']} | {r['programs']} "
                f"| {r['num_warps']} | {r['registers']} | {'**yes**' if r['spills'] else 0} "
                f"| {r['shared_bytes'] / 1024:.0f} | {r['blocks_per_sm']} | {r['waves']:.2f} "
                f"| {r['static_instructions']} | {total:,.0f} | {ffma:.0%} "
                f"| {r['tensor_instructions']:,.0f} | {mem:,.0f}/{shfl:,.0f} "
                f"| {_fmt(r['issue_us'])} | {_fmt(r['memory_us'])} "
                f"| {_fmt(latency_us(r, data['model']))} | {_fmt(r['time_us'])} "
                f"| {r['bound']} |"
            )
            if key in measured:
                got = measured[key][i] if i < len(measured[key]) else None
                row += f" {_fmt(got) if got is not None else ''} |"
            lines.append(row)
        lines.append("")
    tolerated: list[str] = []
    found = problems(scenarios, data["triton"], tolerated)
    lines += ["## Checks", ""]
    lines += [f"- {p}" for p in found] or [
        "- every check passed" + ("" if tolerated else ": no spills, every loop matched")
    ]
    lines += [f"- tolerated (see `spill_tolerated`): {t}" for t in tolerated]
    lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    _atomic_write(path, "\n".join(lines))
    return path


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def cuda_kernel_events(step, repeats: int, warmup: int = 3) -> list:
    """The CUDA kernel events of ``repeats`` calls of ``step`` (after ``warmup`` calls), from
    torch.profiler, in launch order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type.name == "CUDA"]


def measure(scenarios: list[dict], repeats: int = 20) -> dict:
    """On a GPU: the mean CUDA time of every Triton kernel launch of each scenario (in launch
    order), from torch.profiler. Keys: "op|layer id|dtype"."""
    import torch

    from fastcaps.backend import _TRITON_OPS, load_triton_ops

    load_triton_ops()
    results = {}
    for s in scenarios:
        if s["provider"] != "triton" or s.get("options"):
            continue
        layer = Layer(**{k: v for k, v in s["layer"].items() if k != "id"})
        args = _inputs(s["op"], layer, getattr(torch, s["dtype"]), "cuda")

        def step(op=s["op"], args=args, layer=layer):
            out = _call(op, _TRITON_OPS[op], args, layer)
            torch.autograd.grad(out, args, torch.ones_like(out))

        names = [r["kernel"] for r in s["launches"]]
        kernels = cuda_kernel_events(step, repeats)
        ours = [e for e in kernels if any(e.name.startswith(n) for n in set(names))]
        per_launch = [0.0] * len(names)
        for i, e in enumerate(ours[: len(names) * repeats]):
            per_launch[i % len(names)] += e.device_time / repeats
        results[f"{s['op']}|{s['layer']['id']}|{s['dtype']}"] = per_launch
    return results


def _use_fastcaps_from(path: str | None) -> None:
    """Import fastcaps from ``path`` (another checkout) instead of this one, with its top-level
    kernels/ folder as fastcaps.kernels (what the install's package-dir mapping does)."""
    if not path or path in sys.path:
        return
    import importlib.util

    sys.path.insert(0, path)
    for name in [m for m in sys.modules if m == "fastcaps" or m.startswith("fastcaps.")]:
        del sys.modules[name]
    kernels = Path(path) / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastcaps.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastcaps.kernels"] = module
    spec.loader.exec_module(module)


def _run_case(job: tuple) -> list[dict]:
    """One case of the report: the Triton scenario and, when asked, the torch backend's."""
    op, layer, dtype, options, with_torch, fastcaps_from = job
    _use_fastcaps_from(fastcaps_from)
    from fastcaps.backend import _TRITON_OPS, load_triton_ops

    load_triton_ops()
    if op not in _TRITON_OPS:  # an older checkout (--fastcaps-from) without this op
        print(f"{op}: not in {fastcaps_from or 'this checkout'}, skipped", flush=True)
        return []
    print(f"{op} {layer.id} {dtype} {options or ''}", flush=True)
    found = [model_scenario(op, layer, dtype, **options)]
    if with_torch:
        found.append(model_torch_scenario(op, layer, dtype))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (%(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="compile every dtype at the MNIST, CIFAR-like and 100-class "
                             "shapes; exit 1 on a spill or a failed check")  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="an earlier report.json: a before column")
    parser.add_argument("--measure", action="store_true", help="time every kernel on the GPU")
    parser.add_argument("--quick", action="store_true", help="capsule_routing at MNIST only")
    parser.add_argument("--fastcaps-from", type=Path,
                        help="model the fastcaps of another checkout (e.g. a `git worktree` of an "
                             "older commit, for --baseline)")  # fmt: skip
    parser.add_argument("--render", type=Path, metavar="REPORT_JSON",
                        help="rewrite an earlier report.json and its report.md in --out "
                             "(with --baseline, its before columns replaced); compiles "
                             "nothing")  # fmt: skip
    parser.add_argument("--measured-on", metavar="GPU",
                        help="with --render: the GPU that measured it, if the JSON lacks "
                             "it")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes compiling in parallel (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        if args.baseline:
            data |= baseline_columns(args.baseline)
        if args.measured_on and "measured_on" not in data:
            data["measured_on"] = args.measured_on
        args.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(args.out / "report.json", json.dumps(data, default=str))
        print(f"wrote {write_report(data, args.out)} and report.json")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this tool compiles the kernels for sm_90")
    import torch
    import triton

    from benchmarks.static_sm90 import HOPPER

    if args.check:
        cases = [(op, layer, dtype, {})
                 for layer in CHECK_LAYERS
                 for op in ("capsule_routing", "dynamic_routing", "predictions")
                 for dtype in ("float32", "bfloat16", "float16", "float64")]  # fmt: skip
        cases += [
            ("capsule_routing", mnist(128), "float32", {"bias": True, "detach_logits": True}),
            ("capsule_routing", mnist(128), "float32", {"float32_precision": "high"}),
            ("capsule_routing", mnist(128), "float32", {"float32_precision": "medium"}),
            ("capsule_attention_routing", mnist(128), "float32", {"float32_precision": "high"}),
            ("predictions", mnist(128), "float32", {"float32_precision": "high"}),
            # 32-sample forward blocks, the recomputing pairs kernel (detached logits, 6
            # iterations) and chunked parents' statistics on the tensor cores (they spilled once)
            ("capsule_routing", mnist(64), "bfloat16", {}),
            ("capsule_routing", mnist(64), "float32", {"float32_precision": "high"}),
            ("capsule_routing", mnist(64), "float32", {"float32_precision": "medium"}),
            ("capsule_routing", mnist(32), "bfloat16", {"detach_logits": True}),
            ("capsule_routing", MNIST_R6, "bfloat16", {}),
            ("capsule_routing", MNIST_R6, "float32", {"float32_precision": "medium"}),
            ("capsule_routing", CLASSES100, "float32", {"float32_precision": "high"}),
            # the largest row counts of the combine kernels (their squash spilled here once)
            ("capsule_routing", mnist(2048), "bfloat16", {}),
            ("dynamic_routing", mnist(2048), "bfloat16", {}),
            ("capsule_routing", Layer("classes100", 128, 1152, 100), "bfloat16", {}),
            ("squash", mnist(32), "float32", {}),
            ("squash", mnist(32), "float64", {}),
            ("exp_squash", mnist(32), "float32", {}),
            ("exp_squash", mnist(32), "float64", {}),
        ]
        cases += [(op, layer, dtype, {}) for op in ATTENTION_ROUTING_OPS
                  for layer in (mnist(128), EFFICIENT, Layer("classes100", 32, 1152, 100))
                  for dtype in ("float32", "bfloat16", "float16", "float64")
                  if layer.name != "classes100" or dtype == "bfloat16"]  # fmt: skip
    elif args.quick:
        cases = [("capsule_routing", mnist(b), d, {}) for b in (32, 128)
                 for d in ("float32", "bfloat16")]  # fmt: skip
    else:
        cases = [
            (op, layer, dtype, {})
            for op in OPS
            if op not in ATTENTION_ROUTING_OPS
            for layer in REPORT_LAYERS
            for dtype in ("float32", "bfloat16")
            if op in ("capsule_routing", "dynamic_routing") or layer.name == "mnist"
        ]
        cases += [  # the TF32 opt-ins of float32 (torch.set_float32_matmul_precision)
            ("capsule_routing", mnist(b), "float32", {"float32_precision": precision})
            for b in (32, 128)
            for precision in ("high", "medium")
        ]
        cases += [(op, layer, dtype, {}) for op in ATTENTION_ROUTING_OPS
                  for layer in (EFFICIENT, mnist(32), mnist(128))
                  for dtype in ("float32", "bfloat16")]  # fmt: skip
    origin = str(args.fastcaps_from.resolve()) if args.fastcaps_from else None
    # another checkout: its Triton kernels alone (its torch backend may predate the hooks the
    # torch model uses)
    with_torch = not args.check and origin is None
    jobs = [(op, layer, dtype, options, with_torch and not options, origin)
            for op, layer, dtype, options in cases]  # fmt: skip
    if args.jobs > 1:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            results = list(pool.map(_run_case, jobs))
    else:
        results = [_run_case(job) for job in jobs]
    scenarios = [s for pair in results for s in pair]
    data = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(HOPPER).items()},
        "scenarios": scenarios,
    }
    if args.baseline:
        data |= baseline_columns(args.baseline)
    if args.measure:
        _use_fastcaps_from(origin)  # time the kernels that were modelled
        data["measured"] = measure(scenarios)
        data["measured_on"] = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.out / "report.json", json.dumps(data, default=str))
    path = write_report(data, args.out)
    found = problems(scenarios, triton.__version__)
    print(f"wrote {path} and report.json; {len(found)} problem(s)")
    for p in found:
        print("  " + p)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
