"""Render a BenchResult: a rich table (default), JSON (--json), a PNG stage chart (--chart, matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from .run import BenchResult

# stage key -> (label, unit, format)
ROWS = (
    ("load_s", "bundle load", "s"),
    ("preprocess_s", "preprocess", "s"),
    ("vision_s", "vision encode", "s"),
    ("prefill_s", "prefill", "s"),
    ("prefill_tokens_per_s", "prefill", "tok/s"),
    ("ttft_s", "time to first token", "s"),
    ("decode_tokens_per_s", "decode", "tok/s"),
    ("end_to_end_s", "end to end", "s"),
)
CHART_STAGES = (
    ("preprocess_s", "preprocess"),
    ("vision_s", "vision"),
    ("prefill_s", "prefill"),
    ("decode_s", "decode"),
)


def to_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f} s" if v >= 1 else f"{v * 1e3:.1f} ms"
    return f"{v:.2f} {unit}"


def render(result: BenchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    mdl, med, roof, mach = result.model, result.medians, result.roofline, result.machine
    t = Table(
        title=f"skin-offline bench: {mdl['precision']} {mdl['flavor']} on {mdl['provider']}, {mdl['threads']} threads, "
        f"{med['prompt_tokens']:.0f} prompt + {med['new_tokens']:.0f} new tokens, median of {len(result.runs)}"
    )
    t.add_column("stage")
    t.add_column("median", justify="right")
    t.add_column("min .. max", justify="right")
    for key, label, unit in ROWS:
        vals = [r[key] for r in result.runs]
        t.add_row(label, _fmt(med[key], unit), f"{_fmt(min(vals), unit)} .. {_fmt(max(vals), unit)}")
    console.print(t)
    bw = mach.get("bandwidth") or {}
    cores = f"{mach['logical_cores']} logical / {mach.get('physical_cores')} physical cores"
    console.print(
        f"machine: {mach['cpu_model']}, {cores}, {mach['memory_bytes'] / 2**30:.1f} GiB, onnxruntime {mach['onnxruntime']}"
    )
    if mach.get("cpu_features") is not None:
        console.print(
            f"cpu kernels: {', '.join(mach['cpu_features']) or 'none of the int8 features'}; "
            f"calls of >= {mach.get('gemm_min_rows')} rows run the int8 GEMM graph when the bundle has one"
        )
    if mach.get("gpu"):
        g = mach["gpu"]
        console.print(f"gpu: {g['name']} (compute {g['compute_capability']}, {g['memory_bytes'] / 2**30:.1f} GiB)")
    if mach.get("jetson"):
        j = mach["jetson"]
        console.print(
            f"jetson: {j.get('model')} | {j.get('l4t_release')} | power mode: {j.get('power_mode', 'unknown')}"
        )
    if bw:
        console.print(
            f"memory bandwidth (probe): {bw['gb_per_s']:.1f} GB/s  ({', '.join(f'{k} {v}' for k, v in bw['kernels'].items())})"
        )
    console.print(
        f"peak RSS: {result.peak_rss_bytes / 2**30:.2f} GiB; decoder weights {mdl['decoder_weight_bytes'] / 2**30:.2f} GiB, "
        f"KV cache {mdl['kv_bytes_per_token'] * (med['prompt_tokens'] + med['new_tokens']) / 2**20:.1f} MiB at the end"
    )
    line = f"decode roofline ({roof['bytes_per_token'] / 2**30:.2f} GiB read per token):"
    if "measured" in roof:
        line += f" {roof['measured']:.2f} tok/s at the measured {roof['measured_bandwidth_gb_per_s']:.1f} GB/s"
        if "fraction_of_measured" in roof:
            line += f" -> measured decode is {100 * roof['fraction_of_measured']:.0f}% of it"
    console.print(line)
    console.print(
        "  Jetson: "
        + ", ".join(
            f"{k.removeprefix('jetson_')} {roof[k]:.1f} tok/s"
            for k in ("jetson_agx_orin", "jetson_orin_nano_super", "jetson_orin_nano")
        )
        + (f"; this board {roof['this_board']:.1f} tok/s" if "this_board" in roof else "")
    )
    for n in result.notes:
        console.print(f"note: {n}")


def write_chart(result: BenchResult, path: Path) -> Path:
    """Stacked bar of one request's median time split by stage (decode = end to end - time to first token)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    med = dict(result.medians)
    med["decode_s"] = max(0.0, med["end_to_end_s"] - med["ttft_s"])
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for key, label in CHART_STAGES:
        ax.barh([0], [med[key]], left=left, label=f"{label} {med[key]:.2f}s")
        left += med[key]
    ax.set_yticks([])
    ax.set_xlabel("seconds (median)")
    m = result.model
    ax.set_title(
        f"{m['precision']} on {m['provider']}: {med['prompt_tokens']:.0f} prompt + {med['new_tokens']:.0f} new tokens, "
        f"{med['decode_tokens_per_s']:.1f} tok/s decode"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps the legend below the axis, crops the rest
    plt.close(fig)
    return path
