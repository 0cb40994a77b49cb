"""`vramplan plot ...`: figures (PNG/SVG). matplotlib is the [plots] extra: without it each plot
command says so in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vramplan.cli import render
from vramplan.cli.commands import fail
from vramplan.cli.options import Json, Model, Out
from vramplan.errors import VramplanError

plot_app = typer.Typer(no_args_is_help=True, help="Figures (PNG/SVG; needs the [plots] extra: matplotlib).")
Methods = Annotated[str, typer.Option(help="comma-separated methods")]
Trainer = Annotated[str, typer.Option(help="trainer whose defaults apply: hf, trl, plain")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", help="micro-batch size")]
Seq = Annotated[int, typer.Option("--seq-len", "-s", help="sequence length (tokens)")]
Ckpt = Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="non-reentrant activation checkpointing")]


def _plots() -> Any:
    try:
        import vramplan.plots as plots
    except ImportError as e:
        fail(VramplanError(f"plots need matplotlib ({e.name} is missing): pip install 'vramplan[plots]'"))
        raise
    return plots


def _save(make: Any, out_path: Path, json_: bool) -> None:
    if out_path.suffix.lower() not in (".png", ".svg"):
        fail(VramplanError(f"output {str(out_path)!r} must end in .png or .svg"))
    try:
        fig = make()
    except VramplanError as e:
        fail(e)
    fig.savefig(out_path, dpi=130)
    if json_:
        print(json.dumps({"wrote": str(out_path), "format": out_path.suffix.lower().lstrip(".")}))
    else:
        render.out.print(f"wrote {out_path}", markup=False)


@plot_app.command("breakdown")
def plot_breakdown(model: Model = "8b", methods: Methods = "full,lora,qlora,galore,prefix", trainer: Trainer = "hf",
                   batch_size: Batch = 1, seq_len: Seq = 2048, grad_checkpointing: Ckpt = False,
                   out_: Out = Path("breakdown.png"), json_: Json = False) -> None:
    """Stacked components at the peak for several methods, with GPU lines."""
    plots = _plots()
    setups = [{"method": m.strip(), "trainer": trainer, "batch_size": batch_size, "seq_len": seq_len,
               "grad_checkpointing": grad_checkpointing and m.strip() != "prefix"} for m in methods.split(",") if m.strip()]
    _save(lambda: plots.breakdown_figure(model, setups), out_, json_)


@plot_app.command("sweep")
def plot_sweep(over: Annotated[str, typer.Option(help="seq-len, batch-size, lora-rank, model-size")] = "model-size",
               model: Model = "8b", methods: Methods = "full,lora,qlora", trainer: Trainer = "hf", batch_size: Batch = 1,
               seq_len: Seq = 2048, grad_checkpointing: Ckpt = True, out_: Out = Path("sweep.png"), json_: Json = False) -> None:
    """Memory curves per method against one quantity, with GPU lines and where each stops fitting."""
    plots = _plots()
    opts: dict[str, Any] = {"grad_checkpointing": grad_checkpointing, "trainer": trainer}
    if over != "batch-size":
        opts["batch_size"] = batch_size
    if over != "seq-len":
        opts["seq_len"] = seq_len
    _save(lambda: plots.sweep_figure(over, model=model, methods=[m.strip() for m in methods.split(",")], **opts), out_, json_)


@plot_app.command("validation")
def plot_validation(record: Annotated[str | None, typer.Option(help="one record's name: per-phase bars instead")] = None,
                    out_: Out = Path("validation.png"), json_: Json = False) -> None:
    """Estimate against measurement for every committed record (or the phases of one)."""
    plots = _plots()
    from vramplan.records import load_records

    if record:
        recs = [r for r in load_records() if r["setup"].get("name") == record and r.get("status") == "ok"]
        if not recs:
            fail(VramplanError(f"no record named {record!r}; see `vramplan validate --report`"))
        _save(lambda: plots.phases_figure(recs[0]), out_, json_)
    else:
        _save(plots.validation_figure, out_, json_)
