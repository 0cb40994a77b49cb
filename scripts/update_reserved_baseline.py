"""Per-record bands for peak reserved and device total (data/reserved_baseline.json).

Each measured record (data/measurements/*.jsonl) is re-estimated; its signed error
(estimate / measured - 1) gets a band that keeps its sign: tests/test_allocator.py fails when an
error leaves its band. This script refuses to loosen an existing band (a worse error) unless run
with --loosen, and prints what it would change with --check.

    .venv/bin/python scripts/update_reserved_baseline.py [--check] [--loosen]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from vramplan.allocator import NCCL_COMMUNICATOR_BYTES, NCCL_INIT_BYTES
from vramplan.profiler.trainer_dist import record_load_place
from vramplan.records import load_records, record_name, record_totals

OUT = Path(__file__).resolve().parent.parent / "data" / "reserved_baseline.json"
MIN_TOL = 0.01  # one per cent either way at least
SIGN_SLACK = 0.01  # how far past zero a band may reach
# A device figure is comparable when nothing but this process was on the card: device used minus
# peak reserved minus managed memory at most the largest single-process context seen (879 MiB,
# l8b-qlora-paged8-ckpt-b1s4096) plus NCCL's (vramplan.allocator.NCCL_INIT_BYTES) plus 64 MiB.
MAX_OUTSIDE = 879 * 2**20 + NCCL_INIT_BYTES + 64 * 2**20


def device_comparable(rec: dict[str, Any]) -> bool:
    """Nothing but this rank's process on its card, and a cache the run itself shaped: FSDP2 runs
    that built the whole model on the GPU before fully_shard (records without `load: cpu`; users
    load on the CPU) still hold the unsharded model's blocks in their reserved pool."""
    if rec.get("engine") == "fsdp2" and record_load_place(rec) != "cpu":
        return False
    limit = MAX_OUTSIDE + (max(NCCL_COMMUNICATOR_BYTES.values()) if int(rec.get("world_size", 1)) > 1 else 0)
    outside = rec["device_used_end"] - rec["peak_reserved"] - rec.get("managed_bytes", 0)
    return not rec.get("concurrent") and outside <= limit


def band(err: float) -> list[float]:
    tol = max(MIN_TOL, abs(err) / 4)
    if err >= 0:
        return [round(max(err - tol, -SIGN_SLACK), 4), round(err + tol, 4)]
    return [round(err - tol, 4), round(min(err + tol, SIGN_SLACK), 4)]


def keeps_sign(err: float, lo: float, hi: float) -> bool:
    return lo >= -SIGN_SLACK if err >= 0 else hi <= SIGN_SLACK


def current() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in load_records():
        if rec.get("status") != "ok":
            continue
        _, _, res, dev = record_totals(rec)
        entry: dict[str, Any] = {"reserved_error": round(res / rec["peak_reserved"] - 1, 4)}
        if device_comparable(rec):
            entry["device_error"] = round(dev / rec["device_used_end"] - 1, 4)
        key = f'{record_name(rec)}@{rec.get("date", "")}'
        out[key] = entry
    return out


def merge(old: dict[str, Any], new: dict[str, dict[str, Any]], loosen: bool) -> tuple[dict[str, Any], list[str]]:
    refused = []
    merged = {}
    for key, entry in new.items():
        prev = old.get(key, {})
        row: dict[str, Any] = dict(entry)
        for kind in ("reserved", "device"):
            err = entry.get(f"{kind}_error")
            if err is None:
                continue
            lo, hi = prev.get(f"{kind}_band", band(err))
            if not keeps_sign(err, lo, hi):  # the error crossed zero inside its old band: a band of its own
                lo, hi = band(err)
            if not lo <= err <= hi:
                if not loosen:
                    refused.append(f"{key}: {kind} error {err:+.4f} outside its band [{lo:+.4f}, {hi:+.4f}]")
                    row[f"{kind}_error"] = prev.get(f"{kind}_error", err)
                else:
                    lo, hi = band(err)
            row[f"{kind}_band"] = [lo, hi]
        merged[key] = row
    return merged, refused


def summary(entries: dict[str, Any]) -> str:
    lines = []
    for kind in ("reserved", "device"):
        errs = [e[f"{kind}_error"] for e in entries.values() if f"{kind}_error" in e]
        lines.append(f"{kind}: n={len(errs)} median |err| {statistics.median(abs(x) for x in errs):.3f}, "
                     f"worst under {min(errs):+.3f}, worst over {max(errs):+.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report only, write nothing")
    ap.add_argument("--loosen", action="store_true", help="accept errors outside their bands (widen them)")
    args = ap.parse_args(argv)
    old = json.loads(OUT.read_text())["records"] if OUT.exists() else {}
    merged, refused = merge(old, current(), args.loosen)
    print(summary(merged))
    for r in refused:
        print("refused:", r, file=sys.stderr)
    if args.check or refused:
        return 1 if refused else 0
    doc = {"about": "per-record signed errors (estimate/measured - 1) of peak reserved and device total, and the "
                    "band each must stay in; written by scripts/update_reserved_baseline.py, checked by "
                    "tests/test_allocator.py", "records": merged}
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
