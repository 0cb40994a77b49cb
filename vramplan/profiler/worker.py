"""One measured case, run in its own process: `python -m vramplan.profiler.worker SETUP_JSON`.

Prints one JSON record on its last stdout line. Measures as shared/reference/README.md does:
random token ids, `out = model(input_ids=ids, labels=ids)`, `out.loss.backward()`, step,
`zero_grad(set_to_none=True)`, then `del out` (the loop holds the output, logits included, through
backward and step, as the reference runs and HF's example loops do; `hold_outputs: false` drops it
right after forward); before each step the peak counter is reset; per step the record
holds allocated memory at start, after forward, after backward and at the end, and the peaks of
forward, forward+backward and the whole step — all relative to the allocation before the model
was built.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Marker allocations (distinct sizes) let the trace replay find phase boundaries.
_MARKS = {"start": 1001, "after_fwd": 1002, "after_bwd": 1003, "end": 1004}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "peft", "bitsandbytes", "galore-torch", "accelerate", "trl", "liger-kernel", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        with contextlib.suppress(Exception):
            import subprocess

            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    return out


def _mark(torch: Any, name: str, on: bool) -> None:
    if on:
        torch.empty(_MARKS[name] * 512, dtype=torch.uint8, device="cuda")


def _managed_bytes(opt: Any) -> int:
    """Bytes of optimizer state living in CUDA managed memory (bitsandbytes paged optimizers)."""
    total = 0
    for st in getattr(opt, "state", {}).values():
        for v in st.values() if isinstance(st, dict) else ():
            if getattr(v, "is_paged", False):
                total += v.numel() * v.element_size()
    return total


def run_case(setup: dict[str, Any], *, steps: int = 3, trace: bool = False) -> dict[str, Any]:
    import torch

    dev, base, free0, total = _start_cuda(torch, trace=trace)
    run = _load(setup, dev, base)
    rec_steps, tokens_time = _train(torch, run, setup, dev=dev, base=base, steps=steps, trace=trace)
    free1, _ = torch.cuda.mem_get_info()
    b, s = setup["batch_size"], setup["seq_len"]
    rec: dict[str, Any] = {
        "status": "ok",
        "n_params_total": run.n_total, "n_trainable": run.n_train, "trainable_dtypes": run.trainable_dtypes,
        "alloc_after_load": run.alloc_after_load, "alloc_after_wrap": run.alloc_after_wrap,
        "steps": rec_steps,
        "peak_allocated": max(x["peak"] for x in rec_steps),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used_end": total - free1, "device_used_start": total - free0,
        "managed_bytes": _managed_bytes(run.opt),
        "gpu_total": total, "load_s": run.load_s,
        "tokens_per_s": round(b * s * (steps - 1) / tokens_time, 1) if steps > 1 and tokens_time else None,
    }
    if trace:
        snap = torch.cuda.memory._snapshot()
        rec["trace"] = summarise_trace(snap)
        dump_events(snap, str(setup.get("name", "case")))
        torch.cuda.memory._record_memory_history(enabled=None)
    return rec


def _start_cuda(torch: Any, *, trace: bool) -> tuple[Any, int, int, int]:
    """(device, allocated bytes of the bare context, free and total device bytes); every figure of
    the record is relative to that allocation."""
    dev = torch.device("cuda")
    torch.cuda.init()
    torch.manual_seed(0)
    torch.empty(1, device=dev)  # CUDA context
    base = torch.cuda.memory_allocated()
    free0, total = torch.cuda.mem_get_info()
    if trace:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    return dev, base, free0, total


@dataclass(frozen=True)
class _Loaded:
    """The model with its method applied, its optimizer, and what loading them took."""

    model: Any
    opt: Any
    alloc_after_load: int
    alloc_after_wrap: int
    load_s: float
    n_total: int
    n_train: int
    trainable_dtypes: list[str]


def _load(setup: dict[str, Any], dev: Any, base: int) -> _Loaded:
    import torch

    from vramplan.profiler.build import apply_method, build_model, make_optimizer

    t0 = time.time()
    model = build_model(setup, dev)
    alloc_after_load = torch.cuda.memory_allocated() - base
    model = apply_method(model, setup)
    model.train()
    alloc_after_wrap = torch.cuda.memory_allocated() - base
    opt = make_optimizer(model, setup)
    load_s = time.time() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _Loaded(model=model, opt=opt, alloc_after_load=alloc_after_load, alloc_after_wrap=alloc_after_wrap,
                   load_s=round(load_s, 2), n_total=sum(p.numel() for p in model.parameters()),
                   n_train=sum(p.numel() for p in trainable), trainable_dtypes=sorted({str(p.dtype) for p in trainable}))


def _train(torch: Any, run: _Loaded, setup: dict[str, Any], *, dev: Any, base: int, steps: int,
           trace: bool) -> tuple[list[dict[str, Any]], float]:
    """`steps` training steps on random token ids: each step's record, and the seconds of all but
    the first (warm-up) step."""
    from vramplan.profiler.build import compute_dtype

    b, s = setup["batch_size"], setup["seq_len"]
    vocab = setup["hf_config"]["vocab_size"]
    rec_steps = []
    tokens_time = 0.0
    for i in range(steps):
        ids = torch.randint(0, vocab, (b, s), device=dev)  # the previous step's ids are freed after
        st = _step(torch, run, ids, base=base, amp=setup["precision"] == "mixed", cdt=compute_dtype(setup),
                   hold=setup.get("hold_outputs", True), mark=trace and i == steps - 1)
        if i > 0:
            tokens_time += st["step_s"]
        rec_steps.append(st)
    return rec_steps, tokens_time


def _step(torch: Any, run: _Loaded, ids: Any, *, base: int, amp: bool, cdt: Any, hold: bool,
          mark: bool) -> dict[str, Any]:
    """One step: allocated memory at its start and after forward, backward and the step, and the
    peaks up to each (the peak counter is reset at the start)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _mark(torch, "start", mark)
    st: dict[str, Any] = {"alloc_start": torch.cuda.memory_allocated() - base}
    ts = time.time()
    with torch.autocast("cuda", dtype=cdt, enabled=amp):
        out = run.model(input_ids=ids, labels=ids)
    loss = out.loss
    if not hold:  # a loop that keeps only the loss frees the logits here
        del out
    torch.cuda.synchronize()
    st["alloc_after_fwd"] = torch.cuda.memory_allocated() - base
    st["peak_fwd"] = torch.cuda.max_memory_allocated() - base
    _mark(torch, "after_fwd", mark)
    loss.backward()
    torch.cuda.synchronize()
    st["alloc_after_bwd"] = torch.cuda.memory_allocated() - base
    st["peak_bwd"] = torch.cuda.max_memory_allocated() - base
    _mark(torch, "after_bwd", mark)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if hold:  # the loop holds the model output (logits) until the step is done
        del out
    torch.cuda.synchronize()
    st["alloc_end"] = torch.cuda.memory_allocated() - base
    st["peak"] = torch.cuda.max_memory_allocated() - base
    st["reserved_peak"] = torch.cuda.max_memory_reserved()
    st["step_s"] = round(time.time() - ts, 4)
    st["loss"] = float(loss.item())
    _mark(torch, "end", mark)
    return st


def _where(frames: list[dict[str, Any]]) -> str:
    keep = ("transformers/", "peft/", "bitsandbytes/", "galore", "torch/optim", "torch/nn/", "torch/utils/checkpoint",
            "vramplan/")
    picked = []
    for f in frames:
        fn = f.get("filename", "")
        if any(k in fn for k in keep):
            picked.append(f"{fn.rsplit('/', 1)[-1]}:{f.get('line')}:{f.get('name')}")
            if len(picked) == 2:
                break
    return " < ".join(picked) or (frames[0].get("name", "?") if frames else "?")


def dump_events(snapshot: dict[str, Any], name: str) -> None:
    """With VRAMPLAN_EVENTS_DIR set, write the allocator history of this device (every alloc, free
    and segment event: action, address, size, stream, allocation site) and the segments at the end
    to DIR/NAME.jsonl.gz, for scripts/replay_allocator.py to replay offline (read_events)."""
    out_dir = os.environ.get("VRAMPLAN_EVENTS_DIR")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(out_dir, f"{name}.jsonl.gz"), "wt", encoding="utf-8") as fh:
        segs = [{"addr": g["address"], "size": g["total_size"], "stream": g.get("stream", 0),
                 "pool": g.get("segment_type", ""),
                 "blocks": [[b["size"], b.get("requested_size", 0), b["state"]] for b in g.get("blocks", [])]}
                for g in snapshot.get("segments", [])]
        fh.write(json.dumps({"segments": segs, "marks": {k: v * 512 for k, v in _MARKS.items()}}) + "\n")
        for ev in snapshot["device_traces"][0]:
            fh.write(json.dumps([ev["action"], ev["addr"], ev["size"], ev.get("stream", 0),
                                 _where(ev.get("frames", []))]) + "\n")


def segments_by_stream(segments: list[dict[str, Any]], device: int) -> dict[str, dict[str, Any]]:
    """The caching allocator's segments on `device` at the end of a run (torch.cuda.memory_snapshot(),
    no history needed), per stream: how many, their bytes, the bytes allocated in them, and the
    segment sizes in MiB with their counts. Pools are kept per stream (vramplan.allocator_sim), so
    this says which stream's pool holds the reserved memory a run's allocated peak leaves over."""
    out: dict[str, dict[str, Any]] = {}
    for seg in segments:
        if seg.get("device", device) != device:
            continue
        row = out.setdefault(str(seg["stream"]), {"segments": 0, "bytes": 0, "allocated": 0, "sizes_mib": {}})
        row["segments"] += 1
        row["bytes"] += seg["total_size"]
        row["allocated"] += seg["allocated_size"]
        mib = str(round(seg["total_size"] / 2**20))
        row["sizes_mib"][mib] = row["sizes_mib"].get(mib, 0) + 1
    return out


def read_events(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[tuple[str, int, int, int]]]:
    """A file dump_events wrote: (its header -- the segments at the end of the run, the phase
    marks -- and every event as (action, address, size, stream))."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = json.loads(fh.readline())
        events = [(a, addr, size, stream) for a, addr, size, stream, _ in map(json.loads, fh)]
    return header, events


def summarise_trace(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Replay the allocator trace of the last step: what is alive at each phase mark and at the
    peak, grouped by (allocation site, size)."""
    events = snapshot["device_traces"][0]
    sizes = {v * 512: k for k, v in _MARKS.items()}
    alive: dict[int, tuple[int, str]] = {}
    total = 0
    out: dict[str, Any] = {}
    in_step = False
    peak = -1
    peak_set: dict[int, tuple[int, str]] = {}

    def groups(a: dict[int, tuple[int, str]]) -> list[list[Any]]:
        agg: dict[tuple[str, int], int] = {}
        for size, where in a.values():
            agg[(where, size)] = agg.get((where, size), 0) + 1
        rows = sorted(([w, sz, n, sz * n] for (w, sz), n in agg.items()), key=lambda r: -r[3])
        return [r for r in rows if r[3] >= 1 << 20][:40]

    for ev in events:
        act, addr, size = ev["action"], ev["addr"], ev["size"]
        if act == "alloc":
            if size in sizes:
                name = sizes[size]
                if name == "start":
                    in_step = True
                    alive_before = {a: v for a, v in alive.items()}
                    out["start"] = {"bytes": total, "groups": []}
                    del alive_before
                else:
                    out[name] = {"bytes": total, "groups": groups(alive)}
                continue
            alive[addr] = (size, _where(ev.get("frames", [])))
            total += size
            if in_step and total > peak:
                peak = total
                peak_set = dict(alive)
        elif act in ("free_requested",):
            if addr in alive:
                total -= alive.pop(addr)[0]
    out["peak"] = {"bytes": peak, "groups": groups(peak_set)}
    return out


def main() -> None:
    setup = json.loads(sys.argv[1])
    steps = int(setup.pop("steps", 3))
    trace = bool(setup.pop("trace", False))

    from vramplan.profiler import build  # noqa: F401  (fail early on a missing dependency)

    print(json.dumps(recorded_case(setup, lambda: run_case(setup, steps=steps, trace=trace))), flush=True)


def recorded_case(setup: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One case's record: setup, date, GPU and versions, then what `run` measured; an OOM or any
    other failure is a recorded result too, never a crash."""
    import torch

    rec: dict[str, Any] = {"setup": setup, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        rec["gpu"] = torch.cuda.get_device_name(0)
        rec["versions"] = _versions()
        rec.update(run())
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300],
                   peak_allocated=torch.cuda.max_memory_allocated(), gpu_total=torch.cuda.mem_get_info()[1])
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}", tb=traceback.format_exc()[-2500:])
    return rec


if __name__ == "__main__":
    main()
