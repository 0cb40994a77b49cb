"""`--train-config FILE` for the estimate / fit / plan / profile commands: the file's options under
the ones given on the command line, its model unless --model is given, and what was read shown
(a line before the tables; a `train_config` object in --json output)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vramplan.errors import VramplanError

TrainConfigOption = Annotated[Path | None, typer.Option(
    "--train-config", help="read the setup from a training config (TRL, axolotl, LLaMA-Factory YAML, or HF "
    "TrainingArguments JSON/YAML with model_name_or_path); command-line options override it")]


def train_config_param() -> inspect.Parameter:
    """The --train-config parameter for a generated command signature."""
    return inspect.Parameter("train_config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TrainConfigOption)


def _model_given() -> bool:
    """Whether --model was on the command line (its default does not count)."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    src = ctx.get_parameter_source("model")
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def _summary(tc: Any, overridden: list[str]) -> str:
    from rich.markup import escape

    keys = ", ".join(f"{k}={v}" for k, v in tc.read.items() if k not in tc.defaulted)
    defaults = ", ".join(f"{k}={tc.read[k]}" for k in tc.defaulted if k in tc.read)
    lines = [f"[dim]train config {escape(tc.path)} ({tc.source}): model {escape(tc.model)}; read {escape(keys)}[/]"]
    if defaults:
        lines.append(f"[dim]  {tc.source} defaults: {escape(defaults)}[/]")
    if overridden:
        lines.append(f"[dim]  overridden on the command line: {', '.join(overridden)}[/]")
    lines += [f"[yellow]  ignored[/] {escape(k)}: {escape(v)}" for k, v in tc.ignored.items()]
    return "\n".join(lines)


def run_with_train_config(func: Callable[..., Any], kw: dict[str, Any], given: dict[str, Any]) -> Any:
    """Call a setup command with the options of `kw["train_config"]` (if any) under `given`."""
    path = kw.pop("train_config", None)
    if path is None:
        return func(opts=given, **kw)
    from vramplan.cli.render import error_line, out
    from vramplan.readers import read_train_config

    try:
        tc = read_train_config(path)
    except VramplanError as e:
        error_line(e)
        raise typer.Exit(2) from None
    if "model" in kw and not _model_given():
        kw["model"] = tc.model
    overridden = sorted(k for k in given if k in tc.options and given[k] != tc.options[k])
    opts = {**tc.options, **given}
    info = {**tc.to_dict(), "overridden": overridden}
    if not kw.get("json_"):
        out.print(_summary(tc, overridden), soft_wrap=True)
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
