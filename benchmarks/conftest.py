"""Benchmarks run with pytest-benchmark; with --benchmark-disable (CI) they use tiny shapes."""

from __future__ import annotations

from collections import defaultdict

import pytest

from benchmarks.harness import FULL_LAYERS, TINY_LAYERS


def pytest_generate_tests(metafunc):
    if "layer" in metafunc.fixturenames:
        options = metafunc.config.option
        disabled = options.benchmark_disable and not options.benchmark_enable
        layers = TINY_LAYERS if disabled else FULL_LAYERS
        metafunc.parametrize("layer", layers, ids=[layer.id for layer in layers])


def pytest_terminal_summary(terminalreporter, config):
    """Print each provider's time and saved memory relative to the reference, per layer/mode."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    rows = defaultdict(dict)
    for bench in benchmarks:
        if not bench.stats:  # benchmarking disabled: nothing was measured
            continue
        info = bench.extra_info
        rows[(info["layer"], info["mode"])][info["provider"]] = (
            bench.stats.median,
            info.get("saved_bytes"),
        )
    if not rows:
        return
    write = terminalreporter.write_line
    write("")
    write("ratios against the reference (time: median; memory: bytes saved for backward)")
    columns = ("layer", "mode", "provider", "median ms", "speedup", "saved MiB", "memory")
    line = "{:40s} {:8s} {:10s} {:>10s} {:>8s} {:>10s} {:>7s}"
    write(line.format(*columns))
    for (layer, mode), providers in sorted(rows.items()):
        ref_time, ref_saved = providers.get("reference", (None, None))
        for provider, (median, saved) in sorted(providers.items()):
            speedup = f"{ref_time / median:.2f}x" if ref_time else "-"
            mib = f"{saved / 2**20:.1f}" if saved is not None else "-"
            mem = f"{saved / ref_saved:.3f}" if saved is not None and ref_saved else "-"
            write(line.format(layer, mode, provider, f"{median * 1e3:.2f}", speedup, mib, mem))


@pytest.fixture
def record(benchmark):
    """Attach the identifying fields every result carries."""

    def attach(**fields):
        benchmark.extra_info.update(fields)

    return attach
