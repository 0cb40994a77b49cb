"""`--train-config FILE` for the estimate / fit / plan / profile commands: the file's options under
the ones given on the command line, its model unless --model is given, its multi-GPU engine under
the --gpus/--nodes/--zero/--fsdp/--offload flags given (estimate, fit), and what was read shown
(a line before the tables; a `train_config` object in --json output)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from vramplan.errors import VramplanError
from vramplan.readers.engines import ENGINE_KEYS

TrainConfigOption = Annotated[Path | None, typer.Option(
    "--train-config", help="read the setup from a training config (TRL, axolotl, LLaMA-Factory YAML, or HF "
    "TrainingArguments JSON/YAML with model_name_or_path), with its deepspeed / fsdp engine, or the world size and "
    "engine from an accelerate config (then pass --model); command-line options override it")]


def train_config_param() -> inspect.Parameter:
    """The --train-config parameter for a generated command signature."""
    return inspect.Parameter("train_config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TrainConfigOption)


def _given(name: str) -> bool:
    """Whether option `name` was on the command line (its default does not count)."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def _model_given() -> bool:
    """Whether --model was on the command line (its default does not count)."""
    return _given("model")


def _kind(zero: Any, fsdp: Any) -> str:
    return "fsdp" if fsdp else ("deepspeed" if zero else "ddp")


def merge_parallel(flags: Mapping[str, Any], from_file: Mapping[str, Any], given: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """The parallel options a command runs: a flag given on the command line wins, else the
    file's value, else the flag's default. ZeRO and FSDP are one choice: --zero or --fsdp naming
    another kind of engine than the file's (FSDP over a DeepSpeed file, --zero 0 over ZeRO-3)
    replaces the file's whole engine (its zero, fsdp and offload). Returns (options, the file's
    keys the command line overrode)."""
    given = set(given) & set(flags)
    out = {k: flags[k] if k in given or k not in from_file else from_file[k] for k in flags}
    dropped: list[str] = []
    if {"zero", "fsdp"} & given and any(k in from_file for k in ENGINE_KEYS):
        mine = _kind(flags["zero"] if "zero" in given else 0, flags["fsdp"] if "fsdp" in given else None)
        if mine != _kind(from_file.get("zero", 0), from_file.get("fsdp")):
            dropped = [k for k in ENGINE_KEYS if k in from_file and k not in given]
            out.update({k: flags[k] for k in dropped})
    overridden = [k for k in given if k in from_file and flags[k] != from_file[k]]
    return out, sorted({*overridden, *dropped})


def _check_parallel(par: Mapping[str, Any], tc: Any, given: Iterable[str]) -> None:
    """make_parallel's check of the merged options; an error caused by a value from the file names it."""
    from vramplan.distributed import make_parallel, needs_parallel

    try:
        if needs_parallel(**par):
            make_parallel(**par)
    except VramplanError as e:
        mine = set(given)
        from_file = [f"{k}={par[k]}" for k in par if k in tc.parallel and k not in mine and par[k] == tc.parallel[k]]
        if from_file:
            raise VramplanError(f"{e} ({tc.path} sets {', '.join(from_file)}; a command-line flag overrides it)") from None
        raise


def _summary(tc: Any, overridden: list[str], notes: list[str]) -> str:
    from rich.markup import escape

    keys = ", ".join(f"{k}={v}" for k, v in tc.read.items() if k not in tc.defaulted)
    defaults = ", ".join(f"{k}={tc.read[k]}" for k in tc.defaulted if k in tc.read)
    model = escape(tc.model) if tc.model else "none (from --model)"
    engine = f"; engine {escape(tc.engine)}" if tc.engine else ""
    lines = [f"[dim]train config {escape(tc.path)} ({tc.source}): model {model}{engine}; read {escape(keys)}[/]"]
    if defaults:
        lines.append(f"[dim]  {tc.source} defaults: {escape(defaults)}[/]")
    if overridden:
        lines.append(f"[dim]  overridden on the command line: {', '.join(overridden)}[/]")
    lines += [f"[yellow]  ignored[/] {escape(k)}: {escape(v)}" for k, v in tc.ignored.items()]
    lines += [f"[dim]  {escape(n)}[/]" for n in notes]
    return "\n".join(lines)


def _engine(tc: Any, kw: dict[str, Any]) -> tuple[Any, list[str], list[str]]:
    """Merge the file's engine into kw["par"] (estimate, fit); a command without parallel flags
    lists it as ignored. Returns (tc, parallel keys overridden, notes)."""
    if "par" not in kw:
        if tc.engine:
            why = "this command models one GPU without an engine (estimate and fit take it)"
            tc = replace(tc, ignored={**tc.ignored, "(engine)": f"{tc.engine}: {why}"})
        return tc, [], []
    given = [k for k in kw["par"] if _given(k)]
    par, overridden = merge_parallel(kw["par"], tc.parallel, given)
    _check_parallel(par, tc, given)
    kw["par"] = par
    notes = []
    runs_file_engine = any(k in tc.parallel and k not in given and par[k] == tc.parallel[k] for k in ("zero", "fsdp"))
    if runs_file_engine and "gpus" not in given and "gpus" not in tc.parallel:
        notes.append(f"the file runs {tc.engine}: per-GPU figures for {par['gpus']} GPU; pass --gpus N")
    return tc, overridden, notes


def run_with_train_config(func: Callable[..., Any], kw: dict[str, Any], given: dict[str, Any]) -> Any:
    """Call a setup command with the options of `kw["train_config"]` (if any) under `given`."""
    path = kw.pop("train_config", None)
    if path is None:
        return func(opts=given, **kw)
    from vramplan.cli.render import error_line, out
    from vramplan.readers import read_train_config

    try:
        tc = read_train_config(path)
        if "model" in kw and not _model_given():
            if not tc.model:
                raise VramplanError(f"{path}: an {tc.source} config names no model: pass --model")
            kw["model"] = tc.model
        tc, par_overridden, notes = _engine(tc, kw)
    except VramplanError as e:
        error_line(e)
        raise typer.Exit(2) from None
    overridden = sorted({*(k for k in given if k in tc.options and given[k] != tc.options[k]), *par_overridden})
    opts = {**tc.options, **given}
    info = {**tc.to_dict(), "overridden": overridden, "notes": notes}
    if not kw.get("json_"):
        out.print(_summary(tc, overridden, notes), soft_wrap=True)
        return func(opts=opts, **kw)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return func(opts=opts, **kw)
    finally:
        print(_with_info(buf.getvalue(), info), end="")


def _with_info(text: str, info: dict[str, Any]) -> str:
    """The command's JSON with a `train_config` object added (a JSON list is left as it is)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(obj, dict):
        return text
    return json.dumps({**obj, "train_config": info}) + "\n"
