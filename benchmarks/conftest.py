"""Benchmark parametrization and result recording.

``pytest benchmarks/ --benchmark-enable --benchmark-only`` measures the real shapes of
``benchmarks.harness`` on ``$FASTCAPS_BENCH_DEVICE`` (default: cuda when present, else cpu).
Under ``--benchmark-disable`` (the README's test command) every case runs once on tiny shapes
and checks its result against the reference instead, so the suite never rots.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import (
    OPS,
    Layer,
    benchmark_device,
    device_name,
    layers_for,
    providers_for,
)

MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    layer: Layer
    mode: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.provider}-{self.mode}-{self.layer.id}"


def is_tiny(config) -> bool:
    options = config.option
    return bool(options.benchmark_disable and not options.benchmark_enable)


def op_cases(device: str, tiny: bool) -> list[Case]:
    return [
        Case(op, provider, layer, mode)
        for op in OPS
        for layer in layers_for(op, device, tiny)
        for mode in MODES
        for provider in providers_for(op, device, tiny)
    ]


def pytest_configure(config):
    # Tiny runs on a machine without a GPU check the Triton providers under the interpreter (set
    # before triton is imported); real CPU runs leave them out, interpreter times mean nothing.
    if is_tiny(config) and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from fastcaps._interpreter import skip_repatching

        skip_repatching()


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        cases = op_cases(benchmark_device(), is_tiny(metafunc.config))
        metafunc.parametrize("op_case", cases, ids=[c.id for c in cases])


@pytest.fixture
def device() -> str:
    return benchmark_device()


@pytest.fixture
def tiny(request) -> bool:
    return is_tiny(request.config)


@pytest.fixture
def record(benchmark, device):
    """Attach the fields every result carries, plus the given ones."""

    def attach(**fields):
        benchmark.extra_info.update(
            device=device,
            device_name=device_name(device),
            host=platform.node(),
            torch=torch.__version__,
            triton=_triton_version(),
            threads=torch.get_num_threads(),
            **fields,
        )

    return attach


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def pytest_terminal_summary(terminalreporter, config):
    """The summary table of the report, from this run's results."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    results = [
        {**bench.extra_info, "stats": {"median": bench.stats.median}}
        for bench in benchmarks
        if bench.stats and bench.extra_info.get("op")
    ]
    if results:
        from benchmarks.report import summary_lines

        terminalreporter.write_line("")
        for line in summary_lines(results):
            terminalreporter.write_line(line)
