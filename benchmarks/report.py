"""Turn benchmark JSON (pytest-benchmark's ``--benchmark-json``) into a report.

    python -m benchmarks.report benchmarks/results/cpu/benchmarks.json

writes ``report.md`` and PNG plots next to the JSON (or into ``--out``) and prints the summary
table. Everything in the report comes from the JSON: times are do_bench medians (GPU) or
pytest-benchmark medians (CPU); speedups are ratios of those medians within the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

PROVIDER_ORDER = ("reference", "reference-compiled", "naive", "torch", "triton", "triton-fused")
MiB = 2**20


def load_results(paths: list[Path]) -> tuple[list[dict], dict]:
    """Flattened results (extra_info plus ``stats``) and the machine info of the first file."""
    results, machine = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = machine or data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            if bench.get("extra_info", {}).get("op"):
                results.append({**bench["extra_info"], "stats": bench["stats"]})
    return results, machine


def time_ms(result: dict) -> float:
    """The result's median time in ms: do_bench's on GPU, else pytest-benchmark's."""
    if result.get("do_bench_ms"):
        return result["do_bench_ms"][0]
    return result["stats"]["median"] * 1e3


def _providers(rows: dict) -> list[str]:
    present = {p for providers in rows.values() for p in providers}
    return [p for p in PROVIDER_ORDER if p in present]


def _grouped(results: list[dict], op: str) -> dict:
    """(layer, mode) -> provider -> result, for one op, in shape order."""
    rows: dict = defaultdict(dict)
    for r in results:
        if r["op"] == op:
            rows[(r["layer"], r["mode"])][r["provider"]] = r
    order = {"forward": 0, "backward": 1, "full": 2, "train": 3, "eval": 4}
    return dict(sorted(rows.items(), key=lambda kv: (_layer_key(kv[0][0]), order[kv[0][1]])))


def _layer_key(layer_id: str):
    name, batch, *rest = layer_id.split("-")
    return (name, rest, int(batch[1:]))


def _ratio(base: dict | None, result: dict) -> str:
    return f"{time_ms(base) / time_ms(result):.2f}x" if base else "-"


def summary_lines(results: list[dict]) -> list[str]:
    """capsule_routing, forward + backward: time, speedups and memory of every provider."""
    rows = _grouped(results, "capsule_routing")
    lines = [
        "capsule_routing fwd+bwd: median ms, speedup vs reference / vs reference-compiled, "
        "memory saved for backward and peak",
        f"{'layer':34s} {'provider':19s} {'ms':>9s} {'vs ref':>7s} {'vs comp':>7s} "
        f"{'saved MiB':>9s} {'peak MiB':>9s}",
    ]
    for (layer, mode), providers in rows.items():
        if mode != "full":
            continue
        ref, comp = providers.get("reference"), providers.get("reference-compiled")
        for name in _providers({0: providers}):
            r = providers[name]
            saved = f"{r['saved_bytes'] / MiB:.1f}" if "saved_bytes" in r else "-"
            peak = f"{r['peak_bytes'] / MiB:.1f}" if "peak_bytes" in r else "-"
            lines.append(
                f"{layer:34s} {name:19s} {time_ms(r):9.2f} {_ratio(ref, r):>7s} "
                f"{_ratio(comp, r):>7s} {saved:>9s} {peak:>9s}"
            )
    return lines


def _time_table(results: list[dict], op: str) -> list[str]:
    rows = _grouped(results, op)
    providers = _providers(rows)
    if not rows:
        return []
    throughput = op == "capsnet"
    unit = (
        "images/s (speedup vs reference)"
        if throughput
        else "ms (speedup vs reference / vs reference-compiled)"
    )
    out = [f"### {op}", "", f"Median {unit}.", ""]
    out.append("| layer | mode | " + " | ".join(providers) + " |")
    out.append("|---|---|" + "---|" * len(providers))
    for (layer, mode), by_provider in rows.items():
        ref, comp = by_provider.get("reference"), by_provider.get("reference-compiled")
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None:
                cells.append("")
            elif throughput:
                cells.append(f"{r['images_per_s']:.0f} ({_ratio(ref, r)})")
            else:
                cells.append(f"{time_ms(r):.2f} ({_ratio(ref, r)} / {_ratio(comp, r)})")
        out.append(f"| {layer} | {mode} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _memory_table(results: list[dict], op: str) -> list[str]:
    rows = {k: v for k, v in _grouped(results, op).items() if k[1] == "full"}
    providers = _providers(rows)
    if not any("peak_bytes" in r for v in rows.values() for r in v.values()):
        return []
    out = [
        f"### {op}: memory, forward + backward",
        "",
        "MiB saved for backward / peak MiB (ratio of peak to the reference's).",
        "",
        "| layer | " + " | ".join(providers) + " |",
        "|---|" + "---|" * len(providers),
    ]
    for (layer, _), by_provider in rows.items():
        ref = by_provider.get("reference")
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None or "peak_bytes" not in r:
                cells.append("")
                continue
            ratio = f" ({r['peak_bytes'] / ref['peak_bytes']:.3f})" if ref else ""
            cells.append(f"{r['saved_bytes'] / MiB:.1f} / {r['peak_bytes'] / MiB:.1f}{ratio}")
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _plots(results: list[dict], out_dir: Path) -> list[str]:
    """Time (and, where measured, peak memory) vs batch size of every op on the MNIST layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    ops = sorted({r["op"] for r in results})
    for op in ops:
        mode = "train" if op == "capsnet" else "full"
        series: dict = defaultdict(list)
        for r in results:
            shape = r.get("shape", {})
            if (
                r["op"] == op
                and r["mode"] == mode
                and shape.get("name") == "mnist"
                and shape.get("R", 3) == 3
            ):
                series[r["provider"]].append((shape["B"], time_ms(r), r.get("peak_bytes")))
        if not any(len(points) > 1 for points in series.values()):
            continue
        with_memory = any(p[2] for points in series.values() for p in points)
        fig, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(11 if with_memory else 6, 4))
        axes = list(axes) if with_memory else [axes]
        for provider in [p for p in PROVIDER_ORDER if p in series]:
            points = sorted(series[provider])
            batches = [p[0] for p in points]
            axes[0].plot(batches, [p[1] for p in points], marker="o", label=provider)
            if with_memory:
                axes[1].plot(batches, [p[2] / MiB for p in points], marker="o", label=provider)
        axes[0].set(title=f"{op}: time, {mode}", xlabel="batch size", ylabel="ms")
        if with_memory:
            axes[1].set(title=f"{op}: peak memory, {mode}", xlabel="batch size", ylabel="MiB")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        name = f"{op}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def render(results: list[dict], machine: dict, json_names: list[str], plots: list[str]) -> str:
    first = results[0] if results else {}
    lines = [
        f"# Benchmark report: {first.get('device_name', '?')}",
        "",
        f"Generated by `python -m benchmarks.report {' '.join(json_names)}`",
        "from the JSON written by the benchmark suite; nothing here is typed in by hand.",
        "",
        f"- device: {first.get('device')} ({first.get('device_name')}), "
        f"{first.get('threads')} CPU threads",
        f"- torch {first.get('torch')}, triton {first.get('triton')}, "
        f"python {machine.get('python_version', '?')}",
        "- dtype float32; times are medians "
        "(CUDA: `triton.testing.do_bench`; CPU: pytest-benchmark)",
        "- memory: bytes of the storages autograd saves for backward, and the peak above the "
        "inputs during one forward + backward (CUDA: `max_memory_allocated`; CPU: growth of the "
        "resident high-water mark in a fresh process, glibc returning freed blocks >= 64 KiB)",
        "",
        "## Summary",
        "",
        "```",
        *summary_lines(results),
        "```",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Tables", ""]
    for op in TABLE_OPS:
        lines += _time_table(results, op) + _memory_table(results, op)
    return "\n".join(lines) + "\n"


TABLE_OPS = (
    "capsule_routing", "dynamic_routing", "predictions", "squash",
    "capsule_attention_routing", "attention_routing", "exp_squash", "capsnet",
)  # fmt: skip


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="output folder (default: the first JSON's)")
    args = parser.parse_args(argv)
    for path in args.json:
        if not path.is_file():
            parser.error(f"json: no such file {path}")
    results, machine = load_results(args.json)
    if not results:
        parser.error("json: no fastcaps benchmark results in these files")
    out_dir = args.out or args.json[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out_dir)
    json_names = [str(p) for p in args.json]
    write_atomic(out_dir / "report.md", render(results, machine, json_names, plots))
    print("\n".join(summary_lines(results)))
    print(f"wrote {out_dir / 'report.md'} and {len(plots)} plots")


if __name__ == "__main__":
    main()
