"""Replay recorded allocator histories (the profiler's VRAMPLAN_EVENTS_DIR files) through
vramplan.allocator_sim and compare the segments it reserves with the ones the run reserved.

    .venv/bin/python scripts/replay_allocator.py data/traces/*.jsonl.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vramplan.allocator_sim import replay
from vramplan.profiler.worker import read_events

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    a = ap.parse_args()
    print(f"{'history':45s} {'measured':>12s} {'replayed':>12s} {'error':>8s} {'segments':>9s}")
    for path in a.files:
        header, events = read_events(path)
        measured = sum(s["size"] for s in header["segments"])
        sim = replay(events)
        print(f"{path.name.removesuffix('.jsonl.gz'):45s} {measured / MiB:10.0f} M {sim.reserved / MiB:10.0f} M "
              f"{sim.reserved / measured - 1:+8.2%} {sum(1 for x in sim.segments if x):4d}/{len(header['segments']):<4d}")


if __name__ == "__main__":
    main()
