"""Rich tables and lines for the CLI. Everything user-supplied is escaped (no markup injection);
no arithmetic beyond formatting."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vramplan.units import GiB, fmt_count, fmt_gib

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
ATTN_LABELS = {"flash": "flash (FlashAttention-2: saves q, k, v, out and softmax_lse, as SDPA's flash kernel)"}
VERDICT_COLOURS = {"fits": "green", "tight": "yellow", "fits with paging": "yellow"}


def gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def error_line(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)


def table(title: str | None, columns: tuple[str, ...], left: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def resolved_line(requested: str, answered: str, kind: str) -> None:
    """Say which catalogue entry answered a hub id (its architecture stands for the hub model)."""
    if kind == "catalogue" and "/" in requested and requested.strip().lower() != answered:
        out.print(f"[dim]model {escape(requested)}: answered by catalogue entry {escape(answered)}[/]")


def setup_head(e: Any) -> str:
    s = e.setup
    return (f"[bold]{escape(e.model)}[/] · {fmt_count(e.params_total)} params · trainer {s.trainer} · method {s.method} · "
            f"base {s.dtype} · {s.precision} · optimizer {s.optimizer} · batch {s.batch_size} × seq {s.seq_len}"
            + (" · checkpointing" if s.grad_checkpointing else "") + f" · attn {ATTN_LABELS.get(s.attn, s.attn)}"
            + (" → eager (the model has no SDPA)" if s.attn != "eager" and e.attention == "eager" else ""))


def estimate_tables(e: Any) -> None:
    out.print(setup_head(e))
    out.print(f"trainable: {fmt_count(e.params_trainable)} ({100 * e.params_trainable / e.params_total:.2f}%)")
    rows = [(k.replace("_", " "), gib(v), f"{100 * v / e.peak_allocated_bytes:.1f}%") for k, v in e.breakdown.items() if v]
    rows.append(("[bold]peak allocated", f"[bold]{gib(e.peak_allocated_bytes)}", "100.0%"))
    out.print(table(f"breakdown at the peak ({e.peak_phase})", ("component", "GiB", "share"), ("component",), rows))
    prow = [(k + (" ◀ peak" if k == e.peak_phase else ""), gib(v)) for k, v in e.phases.items()]
    out.print(table("peak allocated by phase", ("phase", "GiB"), ("phase",), prow))
    out.print(f"peak allocated [bold]{fmt_gib(e.peak_allocated_bytes)}[/] · peak reserved {fmt_gib(e.peak_reserved_bytes)}"
              f" · device total [bold]{fmt_gib(e.device_total_bytes)}[/]")
    for where, b in e.outside_allocator.items():
        out.print(f"  outside the PyTorch allocator: {escape(where.replace('_', ' '))} {fmt_gib(b)}")
    for n in e.notes:
        out.print(f"[yellow]note:[/] {escape(n)}")


def hint_line(h: Any) -> None:
    out.print(f"[dim]hint: activations are {100 * h.activations_share:.0f}% of the peak; "
              f"--grad-checkpointing gives a device total of {fmt_gib(h.device_total_bytes)}[/]")


def fit_lines(res: Any) -> None:
    for r in res.rows:
        colour = VERDICT_COLOURS.get(r.verdict, "red")
        out.print(f"  [{colour}]{r.verdict:13s}[/] {r.gpu.name:16s} {r.headroom_bytes / GiB:+8.1f} GiB headroom"
                  + "".join(f" · {escape(n)}" for n in r.notes))


def distributed(d: Any) -> None:
    p, s = d.parallel, d.single.setup
    out.print(f"[bold]{escape(d.single.model)}[/] · trainer {s.trainer} · method {s.method} · {p.engine}"
              + (f" ZeRO-{p.zero}" if p.zero else "") + (f" FSDP {p.fsdp}" if p.fsdp else "")
              + (f" · offload {p.offload}" if p.offload != "none" else "")
              + f" · {p.gpus_per_node} GPU(s) × {p.nodes} node(s) · micro-batch {s.batch_size} × seq {s.seq_len}"
              + (" · checkpointing" if s.grad_checkpointing else "") + f" · precision {s.precision}")
    rows = [(k.replace("_", " "), gib(v)) for k, v in d.gpu_parts.items()]
    rows.append(("[bold]peak allocated per GPU", f"[bold]{gib(d.per_gpu_peak_allocated_bytes)}"))
    out.print(table(f"per GPU at the peak ({d.peak_phase})", ("component", "GiB"), ("component",), rows))
    out.print(f"per GPU: peak allocated [bold]{fmt_gib(d.per_gpu_peak_allocated_bytes)}[/] · reserved "
              f"{fmt_gib(d.per_gpu_reserved_bytes)} · device total [bold]{fmt_gib(d.per_gpu_device_total_bytes)}[/]")
    if d.cpu_parts:
        out.print(f"host RAM per node: [bold]{fmt_gib(d.cpu_bytes_per_node)}[/] ("
                  + ", ".join(f"{k.replace('_', ' ')} {fmt_gib(v)}" for k, v in d.cpu_parts.items()) + ")")
    for n in d.single.notes:
        out.print(f"[yellow]note:[/] {escape(n)}")


def fit_table(res: Any) -> None:
    e = res.estimate
    out.print(f"[bold]{escape(e.model)}[/] {e.setup.method} (trainer {e.setup.trainer}) needs [bold]{fmt_gib(e.device_total_bytes)}[/] "
              f"on the device (peak in {e.peak_phase})")
    notes = any(r.notes for r in res.rows)
    t = Table()
    for c in ("GPU", "verdict", "memory GiB", "headroom GiB", "headroom %", "limiting phase", "$/h", *(("notes",) if notes else ())):
        t.add_column(c, justify="left" if c in ("GPU", "verdict", "limiting phase", "notes") else "right")
    for r in res.rows:
        colour = VERDICT_COLOURS.get(r.verdict, "red")
        t.add_row(r.gpu.name, f"[{colour}]{r.verdict}", gib(r.capacity_bytes), f"{r.headroom_bytes / GiB:+,.1f}",
                  f"{100 * r.headroom_share:+.0f}%", r.limiting_phase,
                  f"{r.gpu.price_hour_usd:.2f}" if r.gpu.price_hour_usd else "-", *((escape("; ".join(r.notes)),) if notes else ()))
    out.print(t)


def cheapest_table(e: Any, opts: list[Any]) -> None:
    rows = [(o.gpu.name, str(o.count), o.engine, gib(o.per_gpu_bytes), f"{o.cost_hour_usd:.2f}") for o in opts]
    out.print(table(f"{escape(e.model)} {e.setup.method}: cheapest ways to run it (per-GPU device total ≤ 90% of the card)",
                    ("GPU", "count", "engine", "per GPU GiB", "$/h total"), ("GPU", "engine"), rows))


def plan_table(spec: Any, card: Any, p: Any, seconds: float) -> None:
    out.print(f"[bold]{escape(spec.name)}[/] on [bold]{card.name}[/] ({gib(card.usable_bytes)} GiB): searched {p.searched:,} "
              f"setups in {seconds:.2f} s, {len(p.candidates)} shown")
    if not p.candidates:
        out.print("[red]nothing in the search space fits; try a larger GPU (`vramplan fit`)")
        return
    t = Table()
    for c in ("#", "method", "base", "rank", "precision", "optimizer", "ckpt", "batch", "seq", "accum", "device GiB"):
        t.add_column(c, no_wrap=True)
    for i, c in enumerate(p.candidates, 1):
        s = c.setup
        rank = str(s.lora_rank) if s.method in ("lora", "qlora") else "-"
        t.add_row(str(i), s.method, s.dtype, rank, s.precision, s.optimizer, "yes" if s.grad_checkpointing else "no",
                  str(s.batch_size), str(s.seq_len), str(s.grad_accum), gib(c.device_total_bytes))
    out.print(t)
    out.print("[dim]`--json` lists, for each, what changed from the request[/]")


def profile_table(rec: dict[str, Any], rows: list[tuple[str, int, int]]) -> None:
    body = [(f"{p} (cumulative peak)", gib(m), gib(e), f"{100 * (e / m - 1):+.1f}%") for p, m, e in rows]
    out.print(table(f"measured vs estimated on {escape(str(rec.get('gpu')))}",
                    ("phase", "measured GiB", "estimated GiB", "error"), ("phase",), body))
    out.print(f"tokens/s {rec.get('tokens_per_s')}, peak reserved {fmt_gib(rec['peak_reserved'])}, "
              f"device used {fmt_gib(rec['device_used_end'])}")


def validation_table(comps: list[Any], s: Any) -> None:
    rows = [(escape(c.name), c.method, gib(c.measured), gib(c.estimated), f"{100 * c.error:+.2f}%",
             f"{c.measured_phase}/{c.estimated_phase}") for c in comps]
    out.print(table(f"estimate vs measured peak allocated, {len(comps)} records",
                    ("case", "method", "measured GiB", "estimated GiB", "error", "phase (meas/est)"),
                    ("case", "method", "phase (meas/est)"), rows))
    out.print(f"median |error| {100 * s.median_abs:.2f}% · p90 {100 * s.p90_abs:.2f}% · worst {100 * s.worst_abs:.2f}% · "
              f"worst under-estimate {100 * s.worst_under:.2f}%")


def models_table(rows: list[dict[str, Any]]) -> None:
    t = Table(title="vramplan model catalogue (`--model 70b` picks the model whose 'default for' says 70b)", title_justify="left")
    for c in ("name", "params", "type", "layers", "hidden", "heads/kv", "vocab", "default for"):
        t.add_column(c, justify="right" if c in ("params", "layers", "hidden", "vocab") else "left",
                     no_wrap=c in ("name", "default for"))
    for r in rows:
        t.add_row(r["name"], fmt_count(r["params"]), r["model_type"], str(r["layers"]), str(r["hidden"]),
                  f"{r['heads']}/{r['kv_heads']}", str(r["vocab"]), ", ".join(r["default_for"]))
    out.print(t)


def gpus_table(cards: list[Any]) -> None:
    rows = [(g.name, gib(g.memory_bytes), f"{g.bandwidth_gbs:,.0f}", f"{g.bf16_tflops:g}" + ("" if g.bf16 else " (fp16)"),
             "yes" if g.bf16 else "no", f"{g.price_hour_usd:.2f}" if g.price_hour_usd else "-", ", ".join(g.aliases[:3]))
            for g in sorted(cards, key=lambda g: -g.memory_bytes)]
    out.print(table("vramplan GPU catalogue", ("name", "memory GiB", "bandwidth GB/s", "16-bit TFLOP/s", "bf16", "$/h", "aliases"),
                    ("name", "bf16", "aliases"), rows))
