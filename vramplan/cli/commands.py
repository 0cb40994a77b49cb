"""The commands: parse (options generated from the table) -> build the setup -> call the library
-> render (vramplan.cli.render) or print JSON. No arithmetic here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vramplan.cli import render
from vramplan.cli.options import Json, JsonlOut, Model, Trust, with_setup_options
from vramplan.errors import VramplanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GPU memory planner and VRAM estimator for fine-tuning LLMs.")
FIT_LINE_GPUS = ["RTX-4090", "L40S", "A100-40GB", "A100-SXM-80GB", "H100-SXM-80GB", "H200"]
GpuList = Annotated[list[str] | None, typer.Option("--gpu", help="GPUs to check (repeatable)")]


def fail(e: Exception) -> None:
    render.error_line(e)
    raise typer.Exit(2)


def _emit(obj: Any) -> None:
    print(json.dumps(obj))


def resolve(model: str, opts: dict[str, Any], trust: bool) -> tuple[Any, Any]:
    """(ModelSpec, Estimate): the model resolved once, so nothing later resolves its label again."""
    from vramplan.catalog import resolve_model
    from vramplan.estimator import estimate_setup
    from vramplan.setup import make_setup

    try:
        spec = resolve_model(model, trust_remote_code=trust)
        return spec, estimate_setup(spec, make_setup(spec, **opts))
    except VramplanError as e:
        fail(e)
        raise


def parallel(par: dict[str, Any]) -> Any:
    """The Parallel of the --gpus/--nodes/--zero/--fsdp/--offload flags, or None for one plain GPU."""
    from vramplan.distributed import make_parallel, needs_parallel

    try:
        return make_parallel(**par) if needs_parallel(**par) else None
    except VramplanError as e:
        fail(e)


def model_json(d: dict[str, Any], requested: str) -> dict[str, Any]:
    from vramplan.catalog import catalogue_entry

    d["model"] = {**d["model"], "requested": requested, "catalogue_entry": catalogue_entry(requested)}
    return d


def say_which_model(requested: str, spec: Any) -> None:
    from vramplan.catalog import catalogue_entry

    entry = catalogue_entry(requested)
    render.resolved_line(requested, spec.name, "catalogue" if entry else "other")


@app.command()
def models(json_: Json = False) -> None:
    """The bundled model catalogue (aliases like `70b` resolve to the entry marked default)."""
    from vramplan.catalog import model_catalog, resolve_model

    rows = []
    for m in model_catalog().values():
        a = (spec := resolve_model(m.name)).arch
        rows.append({"name": m.name, "params": spec.params_total, "model_type": a.model_type, "layers": a.layers,
                     "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab,
                     "default_for": list(m.default_for), "aliases": list(m.aliases), "source": m.source})
    _emit(rows) if json_ else render.models_table(rows)


@app.command()
def gpus(json_: Json = False) -> None:
    """The GPU catalogue."""
    from vramplan.catalog import gpu_catalog

    cards = list(gpu_catalog().values())
    if json_:
        _emit([{"name": g.name, "aliases": list(g.aliases), "vendor": g.vendor, "memory_bytes": g.memory_bytes,
                "usable_bytes": g.usable_bytes, "bandwidth_gbs": g.bandwidth_gbs, "bf16_tflops": g.bf16_tflops,
                "bf16": g.bf16, "price_hour_usd": g.price_hour_usd, "source": g.source} for g in cards])
        return
    render.gpus_table(cards)


@app.command("estimate")
@with_setup_options(parallel=True)
def estimate_cmd(model: Model = "8b", gpu: GpuList = None, trust_remote_code: Trust = False, json_: Json = False, *,
                 opts: dict[str, Any], par: dict[str, Any]) -> None:
    """Estimate the memory of one fine-tuning step: breakdown, phases, totals, fit verdicts.
    With --gpus/--zero/--fsdp/--offload: memory per GPU and host RAM under that engine."""
    from vramplan.decide.fit import fit
    from vramplan.decide.hints import checkpointing_hint

    p = parallel(par)
    spec, e = resolve(model, opts, trust_remote_code)
    try:
        res = fit(e, gpu or FIT_LINE_GPUS, spec=spec)
    except VramplanError as ex:
        fail(ex)
    if p is not None:
        from vramplan.distributed import estimate_distributed

        d = estimate_distributed(spec, e.setup, p)
        _emit(model_json(d.to_dict(), model)) if json_ else render.distributed(d)
        return
    hint = checkpointing_hint(spec, e)
    if json_:
        _emit({**model_json(e.to_dict(), model), "hint": hint.to_dict() if hint else None})
        return
    say_which_model(model, spec)
    render.estimate_tables(e)
    if hint:
        render.hint_line(hint)
    render.fit_lines(res)


@app.command("fit")
@with_setup_options(parallel=True)
def fit_cmd(model: Model = "8b", gpu: GpuList = None,
            cheapest_: Annotated[bool, typer.Option("--cheapest", help="rank ways to run it (how many of which GPU, "
                                                    "which ZeRO stage) by hourly price")] = False,
            trust_remote_code: Trust = False, json_: Json = False, *, opts: dict[str, Any], par: dict[str, Any]) -> None:
    """Will it fit? Verdict, headroom and limiting phase for each GPU (per GPU under --zero/--fsdp).
    With --cheapest: the fewest cards of each priced GPU that hold it, cheapest first."""
    from vramplan.decide.fit import cheapest, fit, fit_parallel

    p = parallel(par)
    spec, e = resolve(model, opts, trust_remote_code)
    try:
        if cheapest_:
            found = cheapest(spec, e.setup, gpus=gpu)
            _emit([o.to_dict() for o in found]) if json_ else render.cheapest_table(e, found)
            return
        res = fit_parallel(spec, e, p, gpu) if p is not None else fit(e, gpu, spec=spec)
    except VramplanError as ex:
        fail(ex)
    if json_:
        _emit({**res.to_dict(), "parallel": p.to_dict() if p is not None else None})
        return
    say_which_model(model, spec)
    render.fit_table(res)


@app.command("plan")
@with_setup_options()
def plan_cmd(model: Model = "8b", gpu: Annotated[str, typer.Option(help="target GPU")] = "RTX-4090",
             objective: Annotated[str, typer.Option(help="tokens, memory, fewest-changes")] = "tokens",
             maximize: Annotated[str, typer.Option(help="tokens (batch), seq-len, batch-size")] = "tokens",
             limit: Annotated[int, typer.Option(help="setups to show")] = 10, trust_remote_code: Trust = False,
             json_: Json = False, *, opts: dict[str, Any]) -> None:
    """Search setups that fit a GPU and rank them (largest tokens per step first by default).
    A --method given is kept; other options describe the request the search starts from."""
    from vramplan.catalog import resolve_gpu, resolve_model
    from vramplan.decide.plan import plan
    from vramplan.setup import make_setup

    t0 = time.perf_counter()
    try:
        spec = resolve_model(model, trust_remote_code=trust_remote_code)
        card = resolve_gpu(gpu)
        req = make_setup(spec, **opts)
        p = plan(spec, req, card, objective=objective, maximize=maximize, keep_method="method" in opts, limit=limit)
    except VramplanError as e:
        fail(e)
    dt = time.perf_counter() - t0
    if json_:
        _emit({**p.to_dict(), "seconds": round(dt, 3)})
        return
    render.plan_table(spec, card, p, dt)


def require_cuda() -> None:
    try:
        import torch
    except ImportError:
        fail(VramplanError("profiling needs the [profile] extra (torch, transformers, peft, bitsandbytes): "
                           "pip install 'vramplan[profile]'"))
        raise
    if not torch.cuda.is_available():
        fail(VramplanError("profiling needs a CUDA GPU, and torch.cuda.is_available() is False on this machine"))


@app.command()
@with_setup_options()
def profile(model: Model = "1b", steps: Annotated[int, typer.Option(help="training steps to run")] = 3,
            out_: JsonlOut = None,
            trace: Annotated[bool, typer.Option(help="record allocator history: what is alive at each phase")] = False,
            json_: Json = False, *, opts: dict[str, Any]) -> None:
    """Run real training steps on this machine's CUDA GPU and compare with the estimate."""
    from vramplan.setup import profiler_setup

    spec, e = resolve(model, opts, False)
    setup = profiler_setup(spec, e.setup, name=f"{model}-{e.setup.method}", steps=steps, trace=trace)
    require_cuda()
    from vramplan.profiler.sweep import run_one
    from vramplan.records import measured_vs_estimated, record_estimate

    rec = run_one(setup, timeout_s=3600)[0]
    if out_:
        with out_.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
    if json_:
        _emit(rec)
        return
    if rec.get("status") != "ok":
        fail(VramplanError(f"run ended {rec.get('status')}: {rec.get('error', '')[:300]}"))
    render.profile_table(rec, measured_vs_estimated(rec, record_estimate(rec)))


def _cases(cases: Path) -> list[dict[str, Any]]:
    import yaml

    from vramplan.profiler.sweep import case_setups

    try:
        return case_setups(cases)
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        fail(VramplanError(f"bad cases file {str(cases)!r}: {e.problem or e.context}{where}"))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        fail(VramplanError(f"bad cases file {str(cases)!r}: {detail}; expected `cases:` rows with name, model and estimate options"))
    except VramplanError as e:
        fail(e)
    raise AssertionError("unreachable")


@app.command()
def validate(cases: Annotated[Path | None, typer.Argument(help="YAML file of cases (see data/cases/)")] = None,
             report: Annotated[bool, typer.Option(help="re-estimate the committed records (no GPU)")] = False,
             out_: JsonlOut = None, budget: Annotated[float, typer.Option(help="time budget in seconds")] = 3600,
             reference: Annotated[Path | None, typer.Option(help="also include a reference JSONL (shared/reference)")] = None,
             json_: Json = False) -> None:
    """Measure a matrix of cases on the GPU, or (--report) hold every committed record against the model."""
    from vramplan.records import compare, load_records, load_reference, summarise

    if report or cases is None:
        comps = compare(load_records() + (load_reference(reference) if reference else []))
        if json_:
            _emit([{"name": c.name, "method": c.method, "measured": c.measured, "estimated": c.estimated,
                    "error": round(c.error, 5)} for c in comps])
            return
        render.validation_table(comps, summarise(comps))
        return
    setups = _cases(cases)
    require_cuda()
    from vramplan.profiler.sweep import run_cases

    recs = run_cases(setups, out_ or Path("data/measurements") / f"{cases.stem}.jsonl", budget_s=budget)
    comps = compare([r for r in recs if r.get("status") == "ok"])
    if json_:
        _emit([{"name": c.name, "measured": c.measured, "estimated": c.estimated, "error": round(c.error, 5)} for c in comps])
        return
    for c in comps:
        render.out.print(f"{c.name:40s} measured {render.gib(c.measured)} GiB  estimated {render.gib(c.estimated)} GiB  "
                         f"{100 * c.error:+.2f}%", markup=False)
