"""The caching-allocator model (vramplan.allocator_sim): its rules one by one, and every committed
allocator history (data/traces/, recorded by the profiler with VRAMPLAN_EVENTS_DIR) replayed to the
segments the run really reserved."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.allocator_sim import CachingAllocator, replay
from vramplan.profiler.worker import read_events
from vramplan.units import MiB

TRACES = sorted((Path(__file__).resolve().parent.parent / "data" / "traces").glob("*.jsonl.gz"))


def test_a_request_takes_the_smallest_free_block_that_holds_it():
    a = CachingAllocator()
    big, small = a.malloc(64 * MiB), a.malloc(32 * MiB)
    a.free(big)
    a.free(small)
    block, _, _ = a.malloc(30 * MiB)
    assert block.segment == 1 and a.reserved == 96 * MiB  # the 32 MiB segment, not the 64 MiB one


def test_large_blocks_split_only_when_more_than_1_mib_remains():
    a = CachingAllocator()
    h = a.malloc(40 * MiB)
    a.free(h)
    whole, _, _ = a.malloc(39 * MiB + 512 * 1024)  # 0.5 MiB would remain: the request gets all 40
    assert whole.size == 40 * MiB
    a.free((whole, False, 0))
    part, _, _ = a.malloc(38 * MiB)  # 2 MiB remain: split
    assert part.size == 38 * MiB and a.reserved == 40 * MiB


def test_freed_neighbours_merge_but_segments_never_do():
    a = CachingAllocator()
    x, y = a.malloc(10 * MiB), a.malloc(10 * MiB)  # two segments of their own
    a.free(x)
    a.free(y)
    a.malloc(20 * MiB)  # no block of 20 MiB: a third segment
    assert a.reserved == 40 * MiB
    b = CachingAllocator()
    h = b.malloc(30 * MiB)
    b.free(h)
    p, q = b.malloc(12 * MiB), b.malloc(12 * MiB)  # both carved from the 30 MiB segment
    b.free(p)
    b.free(q)
    b.malloc(30 * MiB)  # merged back whole
    assert b.reserved == 30 * MiB


def test_small_requests_share_2_mib_segments_and_mid_sized_ones_20_mib_segments():
    a = CachingAllocator()
    for _ in range(4):
        a.malloc(512 * 1024)
    a.malloc(3 * MiB)
    a.malloc(3 * MiB)
    assert a.segments == [2 * MiB, 20 * MiB]


def test_streams_keep_their_own_free_blocks():
    a = CachingAllocator()
    h = a.malloc(64 * MiB, stream=7)
    a.free(h)
    a.malloc(64 * MiB, stream=0)
    assert a.reserved == 128 * MiB


@pytest.mark.parametrize("path", TRACES, ids=[p.name.removesuffix(".jsonl.gz") for p in TRACES])
def test_recorded_history_replays_to_the_segments_the_run_reserved(path: Path):
    header, events = read_events(path)
    sim = replay(events)
    assert sorted(x for x in sim.segments if x) == sorted(s["size"] for s in header["segments"])


def test_histories_are_committed():
    assert len(TRACES) >= 8
