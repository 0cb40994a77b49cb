"""Figures: where the memory goes, how it scales, and how the model compares with measurements.
Every function returns a matplotlib Figure (Agg backend, headless); the CLI saves PNG or SVG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.errors import VramplanError
from vramplan.estimator import estimate
from vramplan.units import GiB

COMPONENT_COLOURS = {
    "weights": "#4c72b0", "adapters": "#8172b2", "optimizer_states": "#dd8452", "gradients": "#c44e52",
    "activations": "#55a868", "logits_and_loss": "#937860", "transients": "#da8bc3", "cublas_workspace": "#8c8c8c",
}
DEFAULT_GPUS = ("RTX-4090", "A100-40GB", "L40S", "H100-SXM-80GB", "H200")
SWEEPS = ("seq-len", "batch-size", "lora-rank", "model-size")
MODEL_SIZES = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-nemo-12b", "qwen2.5-14b",
               "qwen2.5-32b", "llama-3.1-70b", "qwen2.5-72b")
METHOD_STYLES = {"full": "-", "lora": "--", "qlora": "-.", "galore": ":", "prefix": (0, (3, 1, 1, 1)), "prompt": (0, (1, 1))}


def _gpu_lines(ax: Any, gpus: Sequence[str], ymax: float) -> None:
    for g in gpus:
        card = resolve_gpu(g)
        y = card.usable_bytes / GiB
        if y <= ymax * 1.6:
            ax.axhline(y, color="#444", lw=0.8, ls=":", zorder=0)
            ax.annotate(card.name, (1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8, color="#444", annotation_clip=False)


def breakdown_figure(model: str, setups: Sequence[dict[str, Any]], *, labels: Sequence[str] | None = None,
                     gpus: Sequence[str] = DEFAULT_GPUS) -> Figure:
    """Stacked bars of the components at each setup's peak, with GPU capacity lines."""
    ests = [estimate(model, **s) for s in setups]
    labels = list(labels or [s.get("method", "full") + (" +ckpt" if s.get("grad_checkpointing") else "") for s in setups])
    fig, ax = plt.subplots(figsize=(1.6 * len(ests) + 3.5, 5.2), layout="constrained")
    bottoms = [0.0] * len(ests)
    for comp, colour in COMPONENT_COLOURS.items():
        vals = [e.breakdown.get(comp, 0) / GiB for e in ests]
        if any(vals):
            ax.bar(labels, vals, bottom=bottoms, color=colour, label=comp.replace("_", " "), width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    for x, e in enumerate(ests):
        ax.text(x, e.peak_allocated_bytes / GiB, f"{e.device_total_bytes / GiB:.1f}", ha="center", va="bottom", fontsize=8)
    top = max(bottoms)
    _gpu_lines(ax, gpus, top)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("peak allocated (GiB); device total above each bar")
    ax.set_title(f"{ests[0].model}: where the memory goes (batch {ests[0].setup.batch_size} × seq {ests[0].setup.seq_len})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=8, frameon=False)
    return fig


def sweep_figure(over: str, *, model: str = "llama-3.1-8b", methods: Sequence[str] = ("full", "lora", "qlora"),
                 values: Sequence[Any] | None = None, gpus: Sequence[str] = DEFAULT_GPUS, **options: Any) -> Figure:
    """Device total against one quantity, one curve per method, GPU lines; each curve's last
    fitting point on each GPU is marked."""
    if over not in SWEEPS:
        raise VramplanError(f"unknown sweep {over!r}: allowed: {', '.join(SWEEPS)}")
    key = {"seq-len": "seq_len", "batch-size": "batch_size", "lora-rank": "lora_rank"}.get(over)
    if values is None:
        values = {"seq-len": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768], "batch-size": [1, 2, 4, 8, 16, 32, 64],
                  "lora-rank": [4, 8, 16, 32, 64, 128, 256], "model-size": list(MODEL_SIZES)}[over]
    fig, ax = plt.subplots(figsize=(9, 5.4), layout="constrained")
    ymax = 0.0
    for m in methods:
        xs, ys = [], []
        for v in values:
            opts = dict(options)
            if key:
                opts[key] = v
            mdl = v if over == "model-size" else model
            try:
                e = estimate(mdl, m, **opts)
            except VramplanError:
                continue
            xs.append(resolve_model(mdl).params_total / 1e9 if over == "model-size" else v)
            ys.append(e.device_total_bytes / GiB)
        if not xs:
            continue
        ymax = max(ymax, max(ys))
        line = ax.plot(xs, ys, marker="o", ms=3.5, ls=METHOD_STYLES.get(m, "-"), label=m)[0]
        for g in gpus:
            cap = resolve_gpu(g).usable_bytes / GiB
            fit = [(x, y) for x, y in zip(xs, ys, strict=True) if y <= cap]
            if fit and len(fit) < len(xs):
                ax.plot(*fit[-1], marker="o", ms=8, mfc="none", mec=line.get_color())
    ax.set_xscale("log", base=2 if over != "model-size" else 10)
    ax.set_yscale("log")
    _gpu_lines(ax, gpus, ymax)
    xlabel = {"seq-len": "sequence length (tokens)", "batch-size": "batch size", "lora-rank": "LoRA rank",
              "model-size": "model size (billion parameters)"}[over]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("device total (GiB)")
    what = "Will it fine-tune?" if over == "model-size" else model
    ax.set_title(f"{what} Device memory against {xlabel}", fontsize=11)
    ax.text(0.99, 0.01, "open circle: the last point that fits each GPU line", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=8, color="#444")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def validation_figure(records: Sequence[dict[str, Any]] | None = None) -> Figure:
    """Estimated against measured peak allocated for every record, by method, with the ±5% band."""
    from vramplan.records import compare, load_records

    comps = compare(list(records) if records is not None else load_records())
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.4), layout="constrained", gridspec_kw={"width_ratios": [1.2, 1]})
    hi = max(max(c.measured, c.estimated) for c in comps) / GiB * 1.1
    lo = min(min(c.measured, c.estimated) for c in comps) / GiB * 0.85
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="#ddd", label="±5%")
    ax.plot([lo, hi], [lo, hi], color="#888", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    methods = sorted({c.method for c in comps})
    for m in methods:
        cs = [c for c in comps if c.method == m]
        ax.scatter([c.measured / GiB for c in cs], [c.estimated / GiB for c in cs], s=18, label=f"{m} ({len(cs)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak allocated (GiB)")
    ax.set_ylabel("estimated peak allocated (GiB)")
    ax.set_title(f"vramplan vs {len(comps)} real H100 runs")
    ax.legend(fontsize=8, loc="upper left")
    errs = sorted((100 * c.error, c.name) for c in comps)
    ax2.barh(range(len(errs)), [e for e, _ in errs], color=["#c44e52" if e < -5 else "#55a868" if abs(e) <= 5 else "#dd8452"
                                                            for e, _ in errs])
    ax2.axvline(-5, color="#888", ls=":")
    ax2.axvline(5, color="#888", ls=":")
    ax2.set_yticks([])
    ax2.set_xlabel("estimate error (%)  — negative: under-estimate")
    ax2.set_title("error per record, sorted")
    return fig


def phases_figure(record: dict[str, Any]) -> Figure:
    """Measured and estimated peak allocated per phase for one record."""
    from vramplan.records import record_estimate

    e = record_estimate(record)
    st = max(record["steps"], key=lambda x: x["peak"])
    # trainer records hold no forward-only peak (no Trainer hook between forward and backward)
    measured = {"forward": st.get("peak_fwd", st["peak_bwd"]), "backward": st["peak_bwd"], "optimizer_step": st["peak"]}
    est = {"forward": e.phases["forward"], "backward": max(e.phases["forward"], e.phases["backward"]),
           "optimizer_step": e.peak_allocated_bytes}
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    xs = range(3)
    ax.bar([x - 0.2 for x in xs], [measured[k] / GiB for k in measured], width=0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [est[k] / GiB for k in measured], width=0.4, label="estimated")
    ax.set_xticks(list(xs), ["up to forward", "up to backward", "whole step"])
    ax.set_ylabel("peak allocated so far (GiB)")
    ax.set_title(record["setup"]["name"])
    ax.legend()
    return fig
