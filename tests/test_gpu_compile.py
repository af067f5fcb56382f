"""Every Triton kernel compiles with the real compiler for an H100 (sm_90), GPU or not.

The interpreter runs the kernels' arithmetic in CI; this runs Triton's compiler over every
kernel variant the launchers produce, in float32, float16, bfloat16 and float64 (see
tests/compile_for_gpu.py), so code that only the compiler rejects fails here, not on a GPU.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU the kernels are compiled and run by every test"
)
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "compile_for_gpu.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("compiled ")]
    for kernel in (
        "squash_forward_kernel",
        "squash_backward_kernel",
        "predictions_forward_kernel",
        "predictions_grad_input_kernel",
        "predictions_grad_weight_kernel",
        "routing_forward_kernel",
        "routing_backward_state_kernel",
        "routing_backward_pairs_kernel",
        "capsule_routing_backward_pairs_kernel",
    ):
        assert any(line.startswith(f"compiled {kernel}(") for line in compiled), kernel
    for pointer in ("*fp32", "*fp64", "*fp16", "*bf16"):
        assert any(
            line.startswith("compiled capsule_routing_backward_pairs_kernel(") and pointer in line
            for line in compiled
        ), pointer
