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

from conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_every_launched_variant_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_static", "--check", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "report.json").read_text())
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
        ):
            assert (dtype, kernel) in launched, (dtype, kernel)
    from benchmarks.gpu_static import spill_tolerated

    rows = [r for s in data["scenarios"] if not spill_tolerated(s) for r in s["launches"]]
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
