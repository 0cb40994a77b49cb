"""Run many cases, one subprocess each (allocator state never leaks between cases), with a rich
progress bar and a time budget; append one JSONL record per case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def case_setups(path: Path, **extra: Any) -> list[dict[str, Any]]:
    """The profiler setups of a cases YAML file (data/cases/*.yaml): each row is `name`, `model`,
    optional `steps`, and estimate() options; validated like any estimate."""
    import yaml

    from vramplan.catalog import resolve_model
    from vramplan.setup import make_setup, profiler_setup

    out = []
    for row in yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]:
        c = dict(row)
        name, model, steps = c.pop("name"), c.pop("model"), c.pop("steps", 3)
        # `trace` replays the allocator history; `serial` marks a case too big to share the GPU
        row_extra = {k: True for k in ("trace", "serial") if c.pop(k, False)}
        # multi-GPU launch (vramplan.profiler.trainer_dist): world size and engine, not Setup fields
        launch = {k: c.pop(k) for k in ("gpus", "zero", "fsdp", "offload") if k in c}
        if launch:  # checked as an estimate's --gpus/--zero/--fsdp/--offload are
            from vramplan.distributed import make_parallel

            make_parallel(**launch)
        row_extra.update(launch)
        spec = resolve_model(model)
        out.append(profiler_setup(spec, make_setup(spec, **c), name=name, steps=steps, **{**extra, **row_extra}))
    return out


def worker_module(setup: dict[str, Any]) -> str:
    """The reference loop (trainer `plain` or none) or a real trainer (`hf`, `trl`)."""
    if setup.get("trainer", "plain") in ("hf", "trl"):
        return "vramplan.profiler.trainer_worker"
    return "vramplan.profiler.worker"


def launch_command(setup: dict[str, Any]) -> list[str]:
    """One process, or torchrun with one process per GPU (each rank prints its own record)."""
    world = int(setup.get("gpus", 1))
    head = [sys.executable, "-m"]
    if world > 1:
        head += ["torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m"]
    return [*head, worker_module(setup), json.dumps(setup)]


def records_in(stdout: str) -> list[dict[str, Any]]:
    """The JSON records ('{"setup"...}') in a launch's stdout. Ranks print at once, so two records
    can share a line (one rank's newline lands after the other's record): decode each start."""
    decoder = json.JSONDecoder()
    recs: list[dict[str, Any]] = []
    at = stdout.find('{"setup"')
    while at >= 0:
        try:
            rec, end = decoder.raw_decode(stdout, at)
        except json.JSONDecodeError:
            end = at + 1  # a record cut by another rank's output: skip it
        else:
            recs.append(rec)
        at = stdout.find('{"setup"', end)
    return recs


def run_one(setup: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]]:
    """The records of one case: one, or one per rank of a multi-GPU launch."""
    # OMP threads for CPU-side optimizer steps under offload (torchrun would set 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "8"))
    # Output goes to files, not pipes: a rank stuck in the driver outlives SIGKILL and would hold a
    # pipe open, so reading it would wait as long (d9-fsdp-l8b's QLoRA held its call to the device's
    # own limit and its stage lines were lost). Its own process group: a timed-out torchrun's ranks
    # would otherwise outlive it and hold their GPUs' memory into the next case (d9-fsdp-gran2b's
    # first launch left 11.3 GiB on GPUs 1-3).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(launch_command(setup), stdout=out, stderr=err, text=True, env=env,
                              start_new_session=True) as proc:
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        # the tail says where it spent the time (the workers' stage lines, trainer_worker._stage)
        return [{"setup": setup, "status": "timeout", "error": f"case ran past {timeout_s:.0f} s",
                 "stderr_tail": stderr[-1500:]}]
    recs = records_in(stdout)
    if recs:
        return sorted(recs, key=lambda r: r.get("rank", 0))
    return [{"setup": setup, "status": "error", "error": (stderr or stdout)[-1500:]}]


def run_cases(setups: list[dict[str, Any]], out: Path, *, budget_s: float = 3600, case_timeout_s: float = 600,
              parallel: int = 1) -> list[dict[str, Any]]:
    """Measure each setup in its own process until the budget runs out; return the records.

    With parallel > 1, that many cases share the GPU at once: each process's
    max_memory_allocated is its own, but device-wide figures (mem_get_info) are not, so such
    records carry `concurrent: true`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    t0 = time.time()
    lock = threading.Lock()
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())

    def one(setup: dict[str, Any]) -> list[dict[str, Any]]:
        left = budget_s - (time.time() - t0)
        if left < 20:
            return []
        recs = run_one(setup, timeout_s=min(case_timeout_s, left))
        for rec in recs:
            rec["concurrent"] = parallel > 1
        return recs

    with Progress(*cols, transient=False) as bar, out.open("a", encoding="utf-8") as fh, \
            ThreadPoolExecutor(max_workers=parallel) as pool:
        task = bar.add_task("profiling", total=len(setups))
        done = 0
        for recs in pool.map(one, setups):
            bar.advance(task)
            done += bool(recs)
            for rec in recs:
                with lock:
                    records.append(rec)
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                bar.console.print(f"{rec['setup'].get('name', '?'):40s} r{rec.get('rank', 0)} {rec.get('status', '?'):7s} "
                                  f"{(rec.get('peak_allocated') or 0) / 2**30:8.3f} GiB {rec.get('error', '')[:120]}")
        if done < len(setups):
            bar.console.print(f"[yellow]time budget spent; {len(setups) - done} cases not run")
    return records
