"""The static sm_90 report over the kernels the launchers really launch: every variant at the
MNIST (B = 32, 128; bfloat16 at 2048), CIFAR-like and 100-class shapes compiles for an H100 in
float32, bfloat16, float16 and float64 without spilling, every loop of the model is matched, at
least one wave at B = 32 for kernels modelled over 10 us, and tensor-core instructions in the
half-precision forward (``--check``, see benchmarks/gpu_static.py). No GPU is needed: Triton's
own compiler and ptxas run here."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, data_folder

# A folder holding Triton 3.6, the lent H100's toolchain, installed with `pip install --no-deps
# --target DIR triton==3.6.0` (.ci/run does): the check then runs under it as well.
TRITON_36 = os.environ.get("FASTCAPS_TRITON36")


def _static_check(tmp_path, site: str | None = None) -> dict:
    """``gpu_static --check`` in a subprocess (with ``site`` first on the path); its report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_static", "--check", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((tmp_path / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_36, reason="FASTCAPS_TRITON36 (a folder with Triton 3.6) not set")
def test_every_launched_variant_compiles_under_triton_36(tmp_path):
    data = _static_check(tmp_path, TRITON_36)
    assert data["triton"].startswith("3.6."), data["triton"]
    from benchmarks.gpu_static import spill_tolerated

    spilled = [(s["dtype"], s["options"], r["kernel"], r["local_bytes"])
               for s in data["scenarios"] for r in s["launches"]
               if r["spills"] and not spill_tolerated(s, r, data["triton"])]  # fmt: skip
    assert not spilled, spilled
    assert data["scenarios"] and all(
        r["loops_matched"]
        for s in data["scenarios"] if s["dtype"] != "float64" for r in s["launches"]
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_every_launched_variant_compiles_for_sm90_without_spills(tmp_path):
    data = _static_check(tmp_path)
    launched = {(s["dtype"], r["kernel"]) for s in data["scenarios"] for r in s["launches"]}
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        for kernel in (
            "routing_forward_partial_kernel",
            "routing_forward_combine_kernel",
            "routing_backward_partial_kernel",
            "routing_backward_combine_kernel",
            "routing_backward_pairs_kernel",
            "routing_softmax_stats_kernel",  # 100 parents: chunked
            "routing_output_grad_kernel",
            "predictions_forward_kernel",
            "predictions_backward_kernel",
        ):
            assert (dtype, kernel) in launched, (dtype, kernel)
    from benchmarks.gpu_static import spill_tolerated

    rows = [r for s in data["scenarios"] for r in s["launches"]
            if not spill_tolerated(s, r, data["triton"])]  # fmt: skip
    assert rows and not any(r["spills"] for r in rows)
    from benchmarks.gpu_static import ATTENTION_ROUTING_OPS
    from fastcaps.backend import ATTENTION_ROUTING_OPS as BACKEND_ATTENTION_ROUTING_OPS

    assert ATTENTION_ROUTING_OPS == BACKEND_ATTENTION_ROUTING_OPS
    attention = {(s["op"], s["dtype"]) for s in data["scenarios"] if "attention" in s["op"]}
    for op in ATTENTION_ROUTING_OPS:
        for dtype in ("float32", "bfloat16", "float16", "float64"):
            assert (op, dtype) in attention, (op, dtype)
    timed = [r for s in data["scenarios"] if s["dtype"] != "float64" for r in s["launches"]]
    assert timed and all(r["loops_matched"] for r in timed)
    assert (tmp_path / "report.md").read_text().startswith("# Static sm_90 (H100) cost report")
    if torch.cuda.is_available():  # with a GPU the report is written for it as well
        assert data["scenarios"]


@pytest.mark.parametrize(
    "dtype, kernel, spilled, version, tolerated",
    [
        ("float32", "routing_forward_partial_kernel", 40, "3.6.0", True),
        ("float32", "routing_forward_partial_kernel", 48, "3.6.0", False),
        ("float32", "routing_forward_partial_kernel", 40, "3.9.0", False),
        ("float32", "routing_backward_partial_kernel", 8, "3.6.0", False),
        ("float32", "routing_backward_pairs_kernel", 8, "3.6.0", False),
        ("float32", "routing_backward_pairs_kernel", 8, "3.6.0/high", False),
        ("float64", "routing_backward_pairs_kernel", 264, "3.6.0", True),
        ("float64", "routing_backward_pairs_kernel", 8, "3.9.0", False),
        ("bfloat16", "routing_forward_partial_kernel", 8, "3.6.0", False),
        ("float32", "predictions_backward_kernel", 8, "3.6.0", True),
        ("float32", "predictions_backward_kernel", 16, "3.6.0", False),
        # under "high" only, and the float32 pairs kernel where it recomputes u_hat
        ("float32", "predictions_backward_kernel", 32, "3.6.0/high", True),
        ("float32", "predictions_backward_kernel", 32, "3.6.0", False),
        ("float32", "predictions_backward_kernel", 40, "3.6.0/high", False),
        ("float32", "routing_backward_pairs_kernel", 168, "3.6.0/recomputing", True),
        ("float32", "routing_backward_pairs_kernel", 168, "3.6.0", False),
        ("float32", "routing_backward_pairs_kernel", 168, "3.9.0/recomputing", False),
    ],
    ids=lambda x: str(x),
)
def test_spills_tolerated_under_triton_36_only_up_to_their_limit(
    dtype, kernel, spilled, version, tolerated
):
    from benchmarks.gpu_static import spill_tolerated

    version, _, case = version.partition("/")
    options = {"float32_precision": "high"} if case == "high" else {}
    scenario = {"dtype": dtype, "op": "capsule_routing", "options": options}
    launch = {"kernel": kernel, "local_bytes": spilled, "spills": True,
              "constexprs": {"STORED_COEFFICIENTS": case != "recomputing"}}  # fmt: skip
    assert spill_tolerated(scenario, launch, version) is tolerated


def test_problems_lists_tolerated_spills_apart_from_the_failures():
    from benchmarks.gpu_static import problems

    def launch(kernel: str, spilled: int) -> dict:
        return dict(kernel=kernel, local_bytes=spilled, spills=True, loops_matched=True,
                    constexprs={}, tensor_instructions=0, time_us=1.0, programs=132)  # fmt: skip

    scenario = {"provider": "triton", "op": "capsule_routing", "dtype": "float32",
                "layer": {"id": "mnist-B128", "B": 128},
                "launches": [launch("routing_forward_partial_kernel", 40),
                             launch("routing_backward_partial_kernel", 8)]}  # fmt: skip
    tolerated: list[str] = []
    found = problems([scenario], "3.6.0", tolerated)
    assert found == ["capsule_routing mnist-B128 float32: routing_backward_partial_kernel spills "
                     "(8 B local memory)"]  # fmt: skip
    assert tolerated == ["capsule_routing mnist-B128 float32: routing_forward_partial_kernel "
                         "spills 40 B"]  # fmt: skip
    assert problems([scenario], "3.6.0") == found  # without the list: the same failures


def test_ffma_floor_counts_only_the_ffmas_over_every_fp32_pipe():
    from benchmarks.gpu_static import ffma_floor_us

    model = {"sms": 132, "clock_hz": 1.755e9, "pipe_rates": [["fp32", 4.0], ["lsu", 1.0]]}
    scenario = {"launches": [
        {"programs": 264, "dynamic_per_program": {"FFMA": 1000.0, "LDS.64": 5000.0}},
        {"programs": 10, "dynamic_per_program": {"MUFU": 7.0}},
    ]}  # fmt: skip
    # 264 programs x 1000 FFMA = 264,000 warp instructions at 4 per clock on each of 132 SMs
    assert ffma_floor_us(scenario, model) == pytest.approx(264_000 / (4.0 * 132 * 1.755e9) * 1e6)
    # the committed report: the float32 kernels' FFMAs alone are a fraction of their model
    report = json.loads((REPO / "benchmarks/results/static-sm90/report.json").read_text())
    mnist = next(s for s in report["scenarios"] if s["provider"] == "triton"
                 and s["op"] == "capsule_routing" and s["dtype"] == "float32"
                 and s["layer"]["id"].startswith("mnist-B128") and not s["options"])  # fmt: skip
    assert 0 < ffma_floor_us(mnist, report["model"]) < mnist["forward_us"] + mnist["backward_us"]


def test_a_case_an_older_checkout_lacks_is_skipped(monkeypatch, capsys):
    """--fastcaps-from an older commit (the report's "before" column): ops added since then are
    left out of its report instead of failing it."""
    import fastcaps.backend
    from benchmarks.gpu_static import _run_case, mnist

    load_triton_ops = fastcaps.backend.load_triton_ops
    load_triton_ops()
    older = {k: v for k, v in fastcaps.backend._TRITON_OPS.items() if k != "exp_squash"}
    assert "squash" in older
    monkeypatch.setattr(fastcaps.backend, "_TRITON_OPS", older)
    monkeypatch.setattr(fastcaps.backend, "load_triton_ops", lambda: None)
    assert _run_case(("exp_squash", mnist(32), "float32", {}, False, None)) == []
    assert "exp_squash: not in this checkout, skipped" in capsys.readouterr().out


def _gpu_session(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_gpu_session_script_needs_an_output_folder():
    result = _gpu_session()
    assert result.returncode == 2
    assert "usage: bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_session_script_refuses_to_run_without_cuda(tmp_path):
    result = _gpu_session(str(tmp_path / "out"))
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


def test_render_puts_measured_times_beside_the_model(tmp_path):
    """--render rewrites a report from its JSON: measured / model, and with a measured
    --baseline its measured before / after, in the summary."""
    from benchmarks.gpu_static import main

    layer = {"id": "mnist-B128", "name": "mnist", "B": 128}

    def scenario(provider, forward_us, backward_us):
        return {"op": "capsule_routing", "layer": layer, "dtype": "float32",
                "provider": provider, "options": {}, "launches": [],
                "forward_us": forward_us, "backward_us": backward_us}  # fmt: skip

    from dataclasses import asdict

    from benchmarks.static_sm90 import HOPPER

    model = asdict(HOPPER)
    after = {"torch": "2.11", "triton": "3.6", "model": model,
             "scenarios": [scenario("triton", 100.0, 200.0), scenario("torch", 400.0, 500.0)],
             "measured": {"capsule_routing|mnist-B128|float32": [250.0, 500.0]}}  # fmt: skip
    before = {"torch": "2.11", "triton": "3.6", "model": model,
              "scenarios": [scenario("triton", 300.0, 700.0)],
              "measured": {"capsule_routing|mnist-B128|float32": [1500.0, 4500.0]}}  # fmt: skip
    (tmp_path / "after.json").write_text(json.dumps(after))
    (tmp_path / "before.json").write_text(json.dumps(before))
    out = tmp_path / "out"
    assert main(["--render", str(tmp_path / "after.json"), "--baseline",
                 str(tmp_path / "before.json"), "--measured-on", "NVIDIA H200",
                 "--out", str(out)]) == 0  # fmt: skip
    text = (out / "report.md").read_text()
    assert "Measured on NVIDIA H200" in text
    row = next(line for line in text.splitlines() if line.startswith("| capsule_routing"))
    # model 300 (latency-aware 0.0: no launches), torch 900 (3.00x), before 1000 (3.3x),
    # measured 750 (2.50x), before 6000 (8.0x)
    assert row.split(" | ")[3:] == ["300.0", "0.0", "0.0", "900.0", "3.00x", "1,000", "3.3x",
                                    "750.0", "2.50x", "", "6,000", "8.0x |"]  # fmt: skip
    assert json.loads((out / "report.json").read_text())["measured_on"] == "NVIDIA H200"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_tiling_sweep_times_the_plan_first_and_stops_at_its_budget(tmp_path):
    """The sweep a GPU lease runs: with no budget left it still times the plan's tiling (its
    reference), then stops and says so; its JSON is written."""
    from benchmarks.tiling_sweep import main

    assert (
        main(["--out", str(tmp_path), "--layer", "3", "5", "2", "3", "2", "--budget-s", "0"]) == 0
    )
    data = json.loads((tmp_path / "tiling-sweep.json").read_text())
    (case,) = data["cases"]
    assert case["override"] == {} and case["relative_difference"] == 0.0 and case["ms"] > 0
    assert (case["kernel_ms"] is None) == (not torch.cuda.is_available())
    assert data["stopped"] == "budget of 0 s spent"


def test_latency_term_runs_resident_blocks_side_by_side():
    """Two programs per SM take two rounds of one warp's instructions when one block fits, one
    round when two do; the latency-aware total takes the largest of issue, memory and latency."""
    from dataclasses import asdict

    from benchmarks.gpu_static import WARP_CYCLES_PER_INSTRUCTION, latency_aware_us, latency_us
    from benchmarks.static_sm90 import HOPPER

    model = asdict(HOPPER)
    launch = {"programs": 2 * model["sms"], "num_warps": 8, "blocks_per_sm": 1,
              "dynamic_per_program": {"FFMA": 6000.0, "LDS": 2000.0},  # 1000 per warp
              "issue_us": 1.0, "memory_us": 2.0, "launch_us": 2.0}  # fmt: skip
    one_round = 1000 * WARP_CYCLES_PER_INSTRUCTION / model["clock_hz"] * 1e6
    assert latency_us(launch, model) == pytest.approx(2 * one_round)
    assert latency_us(launch | {"blocks_per_sm": 2}, model) == pytest.approx(one_round)
    assert latency_aware_us({"launches": [launch]}, model) == pytest.approx(2 * one_round + 2.0)
    slow_memory = launch | {"memory_us": 100.0}
    assert latency_aware_us({"launches": [slow_memory]}, model) == pytest.approx(102.0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_host_overhead_times_every_mode_and_restores_the_launcher():
    from triton.runtime import interpreter

    from benchmarks.host_overhead import MODES, main
    from fastcaps import custom_ops

    run = interpreter.InterpretedFunction.run
    result = main(["--calls", "2", "--capsules", "3"])
    assert set(result) == {name for name, _, _ in MODES} | {"reference aten ops",
                                                            "torch aten ops"}  # fmt: skip
    assert all(value > 0 for value in result.values())
    assert interpreter.InterpretedFunction.run is run and custom_ops.DIRECT_CALLS


@pytest.mark.skipif(
    not (data_folder("mnist") / "train-images-idx3-ubyte.gz").is_file(),
    reason="real MNIST files not found (set FASTCAPS_DATA)",
)
def test_profile_step_times_counts_and_profiles_the_training_step(tmp_path):
    from benchmarks.profile_step import main

    result = main(["--out", str(tmp_path), "--model", "efficient", "--steps", "1", "--warmup",
                   "0", "--data-dir", str(data_folder("mnist"))])  # fmt: skip
    assert result["batch_size"] == 16  # the recipe's
    assert result["step_ms"] > 0 and result["aten_ops_per_step"] > 100
    assert (result["cuda_kernel_ms_per_step"] is None) == (not torch.cuda.is_available())
    table = (tmp_path / "profile-efficient.txt").read_text()
    assert "Self CPU" in table and json.loads((tmp_path / "profile-efficient.json").read_text())
