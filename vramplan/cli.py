"""The command line: parse -> build the setup -> call the library -> render. No arithmetic here."""



import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vramplan.errors import VramplanError
from vramplan.units import GiB, fmt_count, fmt_gib

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GPU memory planner and VRAM estimator for fine-tuning LLMs.")
plot_app = typer.Typer(no_args_is_help=True, help="Figures (PNG/SVG).")
out = Console()
err = Console(stderr=True)

# ---- options shared by estimate / fit / plan / profile ---------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="catalogue name or alias (see `vramplan models`), config.json path, or hub id")]
Method = Annotated[str, typer.Option(help="full, lora, qlora, galore, prefix, prompt, ia3, bitfit")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", help="micro-batch size")]
Seq = Annotated[int, typer.Option("--seq-len", "-s", help="sequence length (tokens)")]
Dtype = Annotated[str | None, typer.Option(help="base weights: fp32, fp16, bf16, int8, nf4, fp4 (qlora: nf4)")]
Precision = Annotated[str, typer.Option(help="pure, mixed (fp32 master weights + autocast), fp32")]
Optim = Annotated[str, typer.Option("--optimizer", "-o", help="adamw, adamw-fused, adamw-8bit, paged-adamw, paged-adamw-8bit, "
                                    "sgd, sgd-momentum, adafactor, lion, lion-8bit")]
Ckpt = Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="non-reentrant activation checkpointing")]
Attn = Annotated[str, typer.Option(help="sdpa, flash, eager")]
Rank = Annotated[int, typer.Option(help="LoRA rank")]
Alpha = Annotated[float | None, typer.Option(help="LoRA alpha (default 2*rank)")]
Dropout = Annotated[float, typer.Option(help="LoRA dropout")]
Targets = Annotated[str, typer.Option(help="all-linear, attention, or module names: q_proj,v_proj")]
GRank = Annotated[int, typer.Option(help="GaLore rank")]
Prefix = Annotated[int, typer.Option(help="virtual tokens (prefix / prompt tuning)")]
DQ = Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="4-bit double quantisation")]
Kbit = Annotated[bool, typer.Option("--kbit-prepare/--no-kbit-prepare", help="peft prepare_model_for_kbit_training (fp32 upcast)")]
Accum = Annotated[int, typer.Option(help="gradient accumulation steps")]
Hold = Annotated[bool, typer.Option("--hold-outputs/--no-hold-outputs", help="the loop keeps the model output (logits) through backward and step")]
Trust = Annotated[bool, typer.Option(help="allow code from a hub model repository (off by default)")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object")]
Gpus = Annotated[int, typer.Option(help="GPUs per node (data parallel)")]
Nodes = Annotated[int, typer.Option(help="nodes")]
Zero = Annotated[int, typer.Option(help="DeepSpeed ZeRO stage 0-3")]
Fsdp = Annotated[str | None, typer.Option(help="PyTorch FSDP: full_shard, shard_grad_op, no_shard")]
Offload = Annotated[str, typer.Option(help="none, optimizer (ZeRO-Offload), params (ZeRO-3 / FSDP parameter offload)")]


def _parallel(gpus: int, nodes: int, zero: int, fsdp: str | None, offload: str) -> Any:
    """The Parallel options, or None for a single GPU without an engine."""
    if gpus == 1 and nodes == 1 and not zero and not fsdp and offload == "none":
        return None
    from vramplan.distributed import make_parallel

    try:
        return make_parallel(gpus=gpus, nodes=nodes, zero=zero, fsdp=fsdp, offload=offload)
    except VramplanError as e:
        _fail(e)


def _render_distributed(d: Any) -> None:
    p = d.parallel
    e = d.single
    s = e.setup
    out.print(f"[bold]{e.model}[/] · method {s.method} · {p.engine}"
              + (f" ZeRO-{p.zero}" if p.zero else "") + (f" FSDP {p.fsdp}" if p.fsdp else "")
              + (f" · offload {p.offload}" if p.offload != "none" else "")
              + f" · {p.gpus_per_node} GPU(s) × {p.nodes} node(s) · micro-batch {s.batch_size} × seq {s.seq_len}"
              + (" · checkpointing" if s.grad_checkpointing else ""))
    t = Table(title=f"per GPU at the peak ({d.peak_phase})", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    for k, v in d.gpu_parts.items():
        t.add_row(k.replace("_", " "), _gib(v))
    t.add_row("[bold]peak allocated per GPU", f"[bold]{_gib(d.per_gpu_peak_allocated_bytes)}")
    out.print(t)
    out.print(f"per GPU: peak allocated [bold]{fmt_gib(d.per_gpu_peak_allocated_bytes)}[/] · reserved "
              f"{fmt_gib(d.per_gpu_reserved_bytes)} · device total [bold]{fmt_gib(d.per_gpu_device_total_bytes)}[/]")
    if d.cpu_parts:
        out.print(f"host RAM per node: [bold]{fmt_gib(d.cpu_bytes_per_node)}[/] (" +
                  ", ".join(f"{k.replace('_', ' ')} {fmt_gib(v)}" for k, v in d.cpu_parts.items()) + ")")


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _estimate(model: str, opts: dict[str, Any]):  # noqa: ANN202 (library type, lazily imported)
    from vramplan.estimator import estimate

    try:
        return estimate(model, **opts)
    except VramplanError as e:
        _fail(e)


def _spec(model: str) -> Any:
    """The ModelSpec of a name already validated by an estimate (lazy import keeps startup small)."""
    from vramplan.catalog import resolve_model

    return resolve_model(model)


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


@app.command()
def models(json_: Json = False) -> None:
    """The bundled model catalogue (aliases like `70b` resolve to the entry marked default)."""
    from vramplan.catalog import model_catalog, resolve_model

    rows = []
    for m in model_catalog().values():
        spec = resolve_model(m.name)
        a = spec.arch
        rows.append({"name": m.name, "params": spec.params_total, "model_type": a.model_type, "layers": a.layers,
                     "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab,
                     "default_for": list(m.default_for), "aliases": list(m.aliases), "source": m.source})
    if json_:
        print(json.dumps(rows, indent=1))
        return
    t = Table(title="vramplan model catalogue (`--model 70b` picks the model whose 'default for' says 70b)",
              title_justify="left")
    for c in ("name", "params", "type", "layers", "hidden", "heads/kv", "vocab", "default for"):
        t.add_column(c, justify="right" if c in ("params", "layers", "hidden", "vocab") else "left",
                     no_wrap=c in ("name", "default for"))
    for r in rows:
        t.add_row(r["name"], fmt_count(r["params"]), r["model_type"], str(r["layers"]), str(r["hidden"]),
                  f"{r['heads']}/{r['kv_heads']}", str(r["vocab"]), ", ".join(r["default_for"]))
    out.print(t)


@app.command()
def gpus(json_: Json = False) -> None:
    """The GPU catalogue."""
    from vramplan.catalog import gpu_catalog

    cards = list(gpu_catalog().values())
    if json_:
        print(json.dumps([{"name": g.name, "aliases": list(g.aliases), "vendor": g.vendor, "memory_bytes": g.memory_bytes,
                           "usable_bytes": g.usable_bytes, "bandwidth_gbs": g.bandwidth_gbs, "bf16_tflops": g.bf16_tflops,
                           "bf16": g.bf16, "price_hour_usd": g.price_hour_usd, "source": g.source} for g in cards], indent=1))
        return
    t = Table(title="vramplan GPU catalogue", title_justify="left")
    for c in ("name", "memory GiB", "bandwidth GB/s", "16-bit TFLOP/s", "$/h", "aliases"):
        t.add_column(c, justify="left" if c in ("name", "aliases") else "right")
    for g in sorted(cards, key=lambda g: -g.memory_bytes):
        t.add_row(g.name, _gib(g.memory_bytes), f"{g.bandwidth_gbs:,.0f}",
                  f"{g.bf16_tflops:g}" + ("" if g.bf16 else " (fp16)"),
                  f"{g.price_hour_usd:.2f}" if g.price_hour_usd else "-", ", ".join(g.aliases[:3]))
    out.print(t)


def _render_estimate(e: Any, gpus_: list[str] | None) -> None:
    from vramplan.decide.fit import fit

    s = e.setup
    head = (f"[bold]{e.model}[/] · {fmt_count(e.params_total)} params · method {s.method} · base {s.dtype} · "
            f"{s.precision} · optimizer {s.optimizer} · batch {s.batch_size} × seq {s.seq_len}"
            + (" · checkpointing" if s.grad_checkpointing else "") + f" · attn {s.attn}")
    out.print(head)
    out.print(f"trainable: {fmt_count(e.params_trainable)} ({100 * e.params_trainable / e.params_total:.2f}%)")
    t = Table(title=f"breakdown at the peak ({e.peak_phase})", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    for k, v in e.breakdown.items():
        if v:
            t.add_row(k.replace("_", " "), _gib(v), f"{100 * v / e.peak_allocated_bytes:.1f}%")
    t.add_row("[bold]peak allocated", f"[bold]{_gib(e.peak_allocated_bytes)}", "100.0%")
    out.print(t)
    p = Table(title="peak allocated by phase", title_justify="left")
    p.add_column("phase")
    p.add_column("GiB", justify="right")
    for k, v in e.phases.items():
        p.add_row(k + (" ◀ peak" if k == e.peak_phase else ""), _gib(v))
    out.print(p)
    out.print(f"peak allocated [bold]{fmt_gib(e.peak_allocated_bytes)}[/] · peak reserved {fmt_gib(e.peak_reserved_bytes)}"
              f" · device total [bold]{fmt_gib(e.device_total_bytes)}[/]")
    for where, b in e.outside_allocator.items():
        out.print(f"  outside the PyTorch allocator: {where.replace('_', ' ')} {fmt_gib(b)}")
    if not s.grad_checkpointing and e.breakdown.get("activations", 0) > 0.4 * e.peak_allocated_bytes:
        from dataclasses import replace

        from vramplan.catalog import resolve_model
        from vramplan.estimator import estimate_setup

        alt = estimate_setup(resolve_model(e.model), replace(s, grad_checkpointing=True))
        out.print(f"[dim]hint: activations are {100 * e.breakdown['activations'] / e.peak_allocated_bytes:.0f}% of the peak; "
                  f"--grad-checkpointing gives a device total of {fmt_gib(alt.device_total_bytes)}[/]")
    res = fit(e, gpus_ or ["RTX-4090", "L40S", "A100-40GB", "A100-SXM-80GB", "H100-SXM-80GB", "H200"])
    for r in res.rows:
        colour = {"fits": "green", "tight": "yellow"}.get(r.verdict, "red")
        out.print(f"  [{colour}]{r.verdict:13s}[/] {r.gpu.name:16s} {r.headroom_bytes / GiB:+8.1f} GiB headroom")


@app.command("estimate")
def estimate_cmd(model: Model = "8b", method: Method = "full", batch_size: Batch = 1, seq_len: Seq = 2048,
                 dtype: Dtype = None, precision: Precision = "pure", optimizer: Optim = "adamw",
                 grad_checkpointing: Ckpt = False, attn: Attn = "sdpa", lora_rank: Rank = 16, lora_alpha: Alpha = None,
                 lora_dropout: Dropout = 0.05, lora_targets: Targets = "all-linear", galore_rank: GRank = 128,
                 prefix_tokens: Prefix = 20, double_quant: DQ = True, kbit_prepare: Kbit = True, grad_accum: Accum = 1,
                 hold_outputs: Hold = True, trust_remote_code: Trust = False,
                 gpu: Annotated[list[str] | None, typer.Option(help="GPUs for the fit lines (repeatable)")] = None,
                 gpus: Gpus = 1, nodes: Nodes = 1, zero: Zero = 0, fsdp: Fsdp = None, offload: Offload = "none",
                 json_: Json = False) -> None:
    """Estimate the memory of one fine-tuning step: breakdown, phases, totals, fit verdicts.
    With --gpus/--zero/--fsdp/--offload: memory per GPU and host RAM under that engine."""
    par = _parallel(gpus, nodes, zero, fsdp, offload)
    e = _estimate(model, dict(method=method, batch_size=batch_size, seq_len=seq_len, dtype=dtype, precision=precision,
                               optimizer=optimizer, grad_checkpointing=grad_checkpointing, attn=attn, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                               galore_rank=galore_rank, prefix_tokens=prefix_tokens, double_quant=double_quant,
                               kbit_prepare=kbit_prepare, grad_accum=grad_accum, hold_outputs=hold_outputs,
                               trust_remote_code=trust_remote_code))
    if gpu:
        from vramplan.catalog import resolve_gpu

        try:
            [resolve_gpu(g) for g in gpu]
        except VramplanError as ex:
            _fail(ex)
    if par is not None:
        from vramplan.distributed import estimate_distributed

        d = estimate_distributed(_spec(model), e.setup, par)
        if json_:
            print(json.dumps(d.to_dict()))
        else:
            _render_distributed(d)
        return
    if json_:
        print(json.dumps(e.to_dict()))
    else:
        _render_estimate(e, gpu)


@app.command("fit")
def fit_cmd(model: Model = "8b", method: Method = "full", batch_size: Batch = 1, seq_len: Seq = 2048,
            dtype: Dtype = None, precision: Precision = "pure", optimizer: Optim = "adamw",
            grad_checkpointing: Ckpt = False, attn: Attn = "sdpa", lora_rank: Rank = 16, lora_targets: Targets = "all-linear",
            prefix_tokens: Prefix = 20, grad_accum: Accum = 1,
            gpu: Annotated[list[str] | None, typer.Option(help="GPUs to check (repeatable; default: all)")] = None,
            gpus: Gpus = 1, nodes: Nodes = 1, zero: Zero = 0, fsdp: Fsdp = None, offload: Offload = "none",
            cheapest_: Annotated[bool, typer.Option("--cheapest", help="rank ways to run it (how many of which GPU, "
                                                    "which ZeRO stage) by hourly price")] = False,
            json_: Json = False) -> None:
    """Will it fit? Verdict, headroom and limiting phase for each GPU (per GPU under --zero/--fsdp).
    With --cheapest: the fewest cards of each priced GPU that hold it, cheapest first."""
    from vramplan.decide.fit import fit

    par = _parallel(gpus, nodes, zero, fsdp, offload)
    e = _estimate(model, dict(method=method, batch_size=batch_size, seq_len=seq_len, dtype=dtype, precision=precision,
                               optimizer=optimizer, grad_checkpointing=grad_checkpointing, attn=attn, lora_rank=lora_rank,
                               lora_targets=lora_targets, prefix_tokens=prefix_tokens, grad_accum=grad_accum))
    if cheapest_:
        from vramplan.decide.fit import cheapest

        try:
            opts = cheapest(_spec(model), e.setup, gpus=gpu)
        except VramplanError as ex:
            _fail(ex)
        if json_:
            print(json.dumps([o.to_dict() for o in opts]))
            return
        t = Table(title=f"{e.model} {e.setup.method}: cheapest ways to run it (per-GPU device total ≤ 90% of the card)",
                  title_justify="left")
        for c in ("GPU", "count", "engine", "per GPU GiB", "$/h total"):
            t.add_column(c, justify="left" if c in ("GPU", "engine") else "right")
        for o in opts:
            t.add_row(o.gpu.name, str(o.count), o.engine, _gib(o.per_gpu_bytes), f"{o.cost_hour_usd:.2f}")
        out.print(t)
        return
    if par is not None:
        from dataclasses import replace as _replace

        from vramplan.distributed import estimate_distributed

        d = estimate_distributed(_spec(model), e.setup, par)
        e = _replace(e, device_total_bytes=d.per_gpu_device_total_bytes, peak_phase=d.peak_phase)
    try:
        res = fit(e, gpu)
    except VramplanError as ex:
        _fail(ex)
    if json_:
        print(json.dumps(res.to_dict()))
        return
    out.print(f"[bold]{e.model}[/] {e.setup.method} needs [bold]{fmt_gib(e.device_total_bytes)}[/] on the device "
              f"(peak in {e.peak_phase})")
    t = Table()
    for c in ("GPU", "verdict", "memory GiB", "headroom GiB", "headroom %", "limiting phase", "$/h"):
        t.add_column(c, justify="left" if c in ("GPU", "verdict", "limiting phase") else "right")
    for r in res.rows:
        colour = {"fits": "green", "tight": "yellow"}.get(r.verdict, "red")
        t.add_row(r.gpu.name, f"[{colour}]{r.verdict}", _gib(r.capacity_bytes), f"{r.headroom_bytes / GiB:+,.1f}",
                  f"{100 * r.headroom_share:+.0f}%", r.limiting_phase,
                  f"{r.gpu.price_hour_usd:.2f}" if r.gpu.price_hour_usd else "-")
    out.print(t)


@app.command("plan")
def plan_cmd(model: Model = "8b", gpu: Annotated[str, typer.Option(help="target GPU")] = "RTX-4090",
             method: Annotated[str | None, typer.Option(help="keep this method (default: search full, lora, qlora, galore)")] = None,
             batch_size: Batch = 1, seq_len: Seq = 2048, lora_rank: Rank = 16, grad_accum: Accum = 1,
             objective: Annotated[str, typer.Option(help="tokens, memory, fewest-changes")] = "tokens",
             maximize: Annotated[str, typer.Option(help="tokens (batch), seq-len, batch-size")] = "tokens",
             limit: Annotated[int, typer.Option(help="setups to show")] = 10, json_: Json = False) -> None:
    """Search setups that fit a GPU and rank them (largest tokens per step first by default)."""
    import time

    from vramplan.catalog import resolve_gpu, resolve_model
    from vramplan.decide.plan import plan
    from vramplan.setup import make_setup

    t0 = time.perf_counter()
    try:
        spec = resolve_model(model)
        card = resolve_gpu(gpu)
        req = make_setup(spec, method=method or "full", batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank,
                         grad_accum=grad_accum)
        p = plan(spec, req, card, objective=objective, maximize=maximize, keep_method=method is not None, limit=limit)
    except VramplanError as e:
        _fail(e)
    dt = time.perf_counter() - t0
    if json_:
        print(json.dumps({**p.to_dict(), "seconds": round(dt, 3)}))
        return
    out.print(f"[bold]{spec.name}[/] on [bold]{card.name}[/] ({_gib(card.usable_bytes)} GiB): searched {p.searched:,} setups "
              f"in {dt:.2f} s, {len(p.candidates)} shown")
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
                  str(s.batch_size), str(s.seq_len), str(s.grad_accum), _gib(c.estimate.device_total_bytes))
    out.print(t)
    out.print("[dim]`--json` lists, for each, what changed from the request[/]")


def _profile_setup(model: str, opts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    from vramplan.catalog import resolve_model
    from vramplan.setup import make_setup, profiler_setup

    try:
        spec = resolve_model(model)
        return profiler_setup(spec, make_setup(spec, **opts), **extra)
    except VramplanError as e:
        _fail(e)
        raise


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:
        _fail(VramplanError("profiling needs the [profile] extra (torch, transformers, peft, bitsandbytes): pip install 'vramplan[profile]'"))
        raise
    if not torch.cuda.is_available():
        _fail(VramplanError("profiling needs a CUDA GPU, and torch.cuda.is_available() is False on this machine"))


@app.command()
def profile(model: Model = "1b", method: Method = "full", batch_size: Batch = 1, seq_len: Seq = 2048,
            dtype: Dtype = None, precision: Precision = "pure", optimizer: Optim = "adamw",
            grad_checkpointing: Ckpt = False, attn: Attn = "sdpa", lora_rank: Rank = 16, lora_targets: Targets = "all-linear",
            galore_rank: GRank = 128, prefix_tokens: Prefix = 20,
            steps: Annotated[int, typer.Option(help="training steps to run")] = 3,
            out_: Annotated[Path | None, typer.Option("--out", help="append the record to this JSONL file")] = None,
            trace: Annotated[bool, typer.Option(help="record allocator history: what is alive at each phase")] = False,
            json_: Json = False) -> None:
    """Run real training steps on this machine's CUDA GPU and compare with the estimate."""
    opts = dict(method=method, batch_size=batch_size, seq_len=seq_len, dtype=dtype, precision=precision, optimizer=optimizer,
                 grad_checkpointing=grad_checkpointing, attn=attn, lora_rank=lora_rank, lora_targets=lora_targets,
                 galore_rank=galore_rank, prefix_tokens=prefix_tokens)
    setup = _profile_setup(model, opts, name=f"{model}-{method}", steps=steps, trace=trace)
    _require_cuda()
    from vramplan.profiler.sweep import run_one
    from vramplan.records import record_estimate

    rec = run_one(setup, timeout_s=3600)
    if out_:
        with out_.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
    if json_:
        print(json.dumps(rec))
        return
    if rec.get("status") != "ok":
        _fail(VramplanError(f"run ended {rec.get('status')}: {rec.get('error', '')[:300]}"))
    e = record_estimate(rec)
    st = max(rec["steps"], key=lambda x: x["peak"])
    t = Table(title=f"measured vs estimated on {rec.get('gpu')}", title_justify="left")
    for c in ("phase", "measured GiB", "estimated GiB", "error"):
        t.add_column(c, justify="left" if c == "phase" else "right")
    meas = {"forward": st["peak_fwd"], "backward": st["peak_bwd"], "optimizer_step": st["peak"]}
    for k, m in meas.items():
        est = max(v for p, v in e.phases.items() if p in ("load", "forward", "backward", "optimizer_step")[: 1 + list(meas).index(k) + 1])
        t.add_row(k + " (cumulative peak)", _gib(m), _gib(est), f"{100 * (est / m - 1):+.1f}%")
    out.print(t)
    out.print(f"tokens/s {rec.get('tokens_per_s')}, peak reserved {fmt_gib(rec['peak_reserved'])}, "
              f"device used {fmt_gib(rec['device_used_end'])}")


@app.command()
def validate(cases: Annotated[Path | None, typer.Argument(help="YAML file of cases (see data/cases/)")] = None,
             report: Annotated[bool, typer.Option(help="re-estimate the committed records (no GPU)")] = False,
             out_: Annotated[Path | None, typer.Option("--out", help="JSONL file to append records to")] = None,
             budget: Annotated[float, typer.Option(help="time budget in seconds")] = 3600,
             reference: Annotated[Path | None, typer.Option(help="also include a reference JSONL (shared/reference)")] = None,
             json_: Json = False) -> None:
    """Measure a matrix of cases on the GPU, or (--report) hold every committed record against the model."""
    from vramplan.records import compare, load_records, load_reference, summarise

    if report or cases is None:
        recs = load_records() + (load_reference(reference) if reference else [])
        comps = compare(recs)
        if json_:
            print(json.dumps([{"name": c.name, "method": c.method, "measured": c.measured, "estimated": c.estimated,
                               "error": round(c.error, 5)} for c in comps]))
            return
        t = Table(title=f"estimate vs measured peak allocated, {len(comps)} records", title_justify="left")
        for c in ("case", "method", "measured GiB", "estimated GiB", "error", "phase (meas/est)"):
            t.add_column(c, justify="left" if c in ("case", "method", "phase (meas/est)") else "right")
        for c in comps:
            t.add_row(c.name, c.method, _gib(c.measured), _gib(c.estimated), f"{100 * c.error:+.2f}%",
                      f"{c.measured_phase}/{c.estimated_phase}")
        out.print(t)
        s = summarise(comps)
        out.print(f"median |error| {100 * s.median_abs:.2f}% · p90 {100 * s.p90_abs:.2f}% · worst {100 * s.worst_abs:.2f}% · "
                  f"worst under-estimate {100 * s.worst_under:.2f}%")
        return
    import yaml

    from vramplan.profiler.sweep import case_setups

    try:
        setups = case_setups(cases)
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        _fail(VramplanError(f"bad cases file {str(cases)!r}: {e.problem or e.context}{where}"))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        _fail(VramplanError(f"bad cases file {str(cases)!r}: {detail}; expected `cases:` rows with name, model and estimate options"))
    except VramplanError as e:
        _fail(e)
    _require_cuda()
    from vramplan.profiler.sweep import run_cases

    target = out_ or Path("data/measurements") / f"{cases.stem}.jsonl"
    recs = run_cases(setups, target, budget_s=budget)
    comps = compare([r for r in recs if r.get("status") == "ok"])
    for c in comps:
        out.print(f"{c.name:40s} measured {_gib(c.measured)} GiB  estimated {_gib(c.estimated)} GiB  {100 * c.error:+.2f}%")
    if comps:
        s = summarise(comps)
        out.print(f"median |error| {100 * s.median_abs:.2f}% · worst {100 * s.worst_abs:.2f}%")


app.add_typer(plot_app, name="plot")


def _save(fig: Any, out_path: Path) -> None:
    if out_path.suffix.lower() not in (".png", ".svg"):
        _fail(VramplanError(f"output {str(out_path)!r} must end in .png or .svg"))
    fig.savefig(out_path, dpi=130)
    out.print(f"wrote {out_path}")


@plot_app.command("breakdown")
def plot_breakdown(model: Model = "8b",
                   methods: Annotated[str, typer.Option(help="comma-separated methods")] = "full,lora,qlora,galore,prefix",
                   batch_size: Batch = 1, seq_len: Seq = 2048, grad_checkpointing: Ckpt = False,
                   o: Annotated[Path, typer.Option("-o", help="PNG or SVG")] = Path("breakdown.png")) -> None:
    """Stacked components at the peak for several methods, with GPU lines."""
    from vramplan.plots import breakdown_figure

    setups = [{"method": m.strip(), "batch_size": batch_size, "seq_len": seq_len,
               "grad_checkpointing": grad_checkpointing and m.strip() != "prefix"} for m in methods.split(",") if m.strip()]
    try:
        _save(breakdown_figure(model, setups), o)
    except VramplanError as e:
        _fail(e)


@plot_app.command("sweep")
def plot_sweep(over: Annotated[str, typer.Option(help="seq-len, batch-size, lora-rank, model-size")] = "model-size",
               model: Model = "8b", methods: Annotated[str, typer.Option(help="comma-separated methods")] = "full,lora,qlora",
               batch_size: Batch = 1, seq_len: Seq = 2048, grad_checkpointing: Ckpt = True,
               o: Annotated[Path, typer.Option("-o", help="PNG or SVG")] = Path("sweep.png")) -> None:
    """Memory curves per method against one quantity, with GPU lines and where each stops fitting."""
    from vramplan.plots import sweep_figure

    opts: dict[str, Any] = {"grad_checkpointing": grad_checkpointing}
    if over != "batch-size":
        opts["batch_size"] = batch_size
    if over != "seq-len":
        opts["seq_len"] = seq_len
    try:
        _save(sweep_figure(over, model=model, methods=[m.strip() for m in methods.split(",")], **opts), o)
    except VramplanError as e:
        _fail(e)


@plot_app.command("validation")
def plot_validation(record: Annotated[str | None, typer.Option(help="one record's name: per-phase bars instead")] = None,
                    o: Annotated[Path, typer.Option("-o", help="PNG or SVG")] = Path("validation.png")) -> None:
    """Estimate against measurement for every committed record (or the phases of one)."""
    from vramplan.plots import phases_figure, validation_figure
    from vramplan.records import load_records

    if record:
        recs = [r for r in load_records() if r["setup"].get("name") == record and r.get("status") == "ok"]
        if not recs:
            _fail(VramplanError(f"no record named {record!r}; see `vramplan validate --report`"))
        _save(phases_figure(recs[0]), o)
    else:
        _save(validation_figure(), o)


def main() -> None:
    try:
        app()
    except VramplanError as e:  # library errors raised outside a command's own handling
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
