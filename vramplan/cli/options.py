"""CLI options generated from the options table (vramplan.options.OPTIONS): every setup option is
a flag of estimate, fit, plan and profile, with its help, choices and trainer presets."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vramplan.options import OPTIONS, Option
from vramplan.readers.commandline import run_with_train_config, train_config_param

KW = inspect.Parameter.KEYWORD_ONLY

Model = Annotated[str, typer.Option("--model", "-m", help="catalogue name or alias (see `vramplan models`), "
                                    "config.json path, or hub id")]
Trust = Annotated[bool, typer.Option(help="allow code from a hub model repository (off by default)")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object")]
Out = Annotated[Path, typer.Option("--out", "-o", help="PNG or SVG")]
JsonlOut = Annotated[Path | None, typer.Option("--out", "-o", help="append the record(s) to this JSONL file")]

# Parallel options: vramplan.distributed.make_parallel's arguments.
PARALLEL: tuple[tuple[str, Any, Any], ...] = (
    ("gpus", int, typer.Option(help="GPUs per node (data parallel)")),
    ("nodes", int, typer.Option(help="nodes")),
    ("zero", int, typer.Option(help="DeepSpeed ZeRO stage 0-3")),
    ("fsdp", str | None, typer.Option(help="PyTorch FSDP: full_shard, shard_grad_op, no_shard")),
    ("offload", str, typer.Option(help="none, optimizer (ZeRO-Offload), params (ZeRO-3 / FSDP parameter offload)")),
)
PARALLEL_DEFAULTS = {"gpus": 1, "nodes": 1, "zero": 0, "fsdp": None, "offload": "none"}


def _value_text(v: Any) -> str:
    """A default or preset as help shows it: a function by its docstring."""
    if callable(v):
        return (v.__doc__ or "derived").strip()
    return str(v).lower() if isinstance(v, bool) else str(v)


def _shown_default(o: Option) -> str:
    presets = [f"{t}: {_value_text(v)}" for t, v in o.presets]
    return _value_text(o.default) + (f"; {'; '.join(presets)}" if presets else "")


def _help(o: Option) -> str:
    return o.help + (f"; one of: {', '.join(o.choices)}" if o.choices else "")


def _decls(o: Option) -> tuple[str, ...]:
    if o.type is bool:
        flag = o.cli_flag
        return (f"{flag}/--no-{flag.removeprefix('--')}",)
    return (o.cli_flag, o.short) if o.short else (o.cli_flag,)


def option_param(o: Option) -> inspect.Parameter:
    """The typer parameter of one table option; None when not given (the preset or default applies)."""
    info = typer.Option(*_decls(o), help=_help(o), show_default=_shown_default(o))
    return inspect.Parameter(o.name, KW, default=None, annotation=Annotated[o.type | None, info])


def setup_params(skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    return [option_param(o) for o in OPTIONS if o.name not in skip]


def parallel_params() -> list[inspect.Parameter]:
    return [inspect.Parameter(n, KW, default=PARALLEL_DEFAULTS[n], annotation=Annotated[t, info]) for n, t, info in PARALLEL]


def with_setup_options(*, parallel: bool = False, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command every table option as a flag. The command receives `opts` (only the options
    the user gave) and, with parallel=True, `par` (the parallel flags) instead of the flags."""
    table = {p.name for p in setup_params(skip)}
    par_names = {n for n, _, _ in PARALLEL}

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name not in ("opts", "par")]

        @functools.wraps(func)
        def command(**kw: Any) -> Any:
            opts = {k: kw.pop(k) for k in list(kw) if k in table}
            given = {k: v for k, v in opts.items() if v is not None}
            if parallel:
                kw["par"] = {k: kw.pop(k) for k in list(kw) if k in par_names}
            return run_with_train_config(func, kw, given)

        params = own + setup_params(skip) + (parallel_params() if parallel else []) + [train_config_param()]
        command.__signature__ = inspect.Signature([p.replace(kind=KW) for p in params])  # type: ignore[attr-defined]
        command.__annotations__ = {}
        del command.__wrapped__  # typer must read the generated signature, not func's
        return command

    return wrap
