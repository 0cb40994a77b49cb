"""A model of PyTorch's CUDA caching allocator that replays a sequence of allocations and frees and
reports the segments it would reserve: the rules of c10/cuda/CUDACachingAllocator.cpp (torch 2.11)
that decide peak reserved, nothing else.

- Requests are rounded up to 512 B (`round_size`); those of at most 1 MiB come from the small
  pool, larger ones from the large pool; pools are kept per stream (`BlockComparatorSize` orders
  by stream first), so a block is only reused by requests on the stream that allocated it.
- A request takes the smallest free block of its pool and stream that holds it (`get_free_block`,
  best fit; max_split_size unset). The block is split when what remains is at least 512 B (small
  pool) or more than 1 MiB (large pool) (`should_split`); otherwise the request gets the whole block.
- With no such block, a new segment is reserved (`alloc_block`): 2 MiB for small requests, 20 MiB
  for requests under 10 MiB, else the request rounded up to 2 MiB (`get_allocation_size`).
- A freed block merges with free neighbours of its own segment (`try_merge_blocks`); segments are
  never merged, and released only by `empty_cache` (`release_cached_blocks`: every segment that is
  one free block); the out-of-memory retry is not modelled.

`vramplan.allocator` costs reserved memory analytically from the same rules; this replay checks
them against recorded allocator histories (scripts/replay_allocator.py, the profiler's
VRAMPLAN_EVENTS_DIR), where it reproduces the measured peak reserved.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from vramplan.allocator import MIN_BLOCK_BYTES, SMALL_SIZE_BYTES, round_request_bytes, segment_bytes


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


@dataclass
class CachingAllocator:
    """The caching allocator's state: segments, and free blocks per (pool, stream) kept sorted by
    size for best fit."""

    reserved: int = 0
    allocated: int = 0
    peak_reserved: int = 0
    peak_allocated: int = 0
    segments: list[int] = field(default_factory=list)  # segment sizes, in the order reserved
    bases: list[int] = field(default_factory=list)  # each segment's device address
    _end: int = 0  # past the highest segment: where a segment without a given address goes
    _free: dict[tuple[bool, int], list[tuple[int, int, int]]] = field(default_factory=dict)  # (size, address, segment)
    _blocks: dict[tuple[int, int], _Block] = field(default_factory=dict)  # free blocks by (address, segment)

    def _pool(self, small: bool, stream: int) -> list[tuple[int, int, int]]:
        return self._free.setdefault((small, stream), [])

    def _key(self, b: _Block) -> tuple[int, int]:
        """The block's address (a released segment's address can come back: the segment too)."""
        return self.bases[b.segment] + b.offset, b.segment

    def _add_free(self, b: _Block, small: bool, stream: int) -> None:
        b.free = True
        bisect.insort(self._pool(small, stream), (b.size, *self._key(b)))
        self._blocks[self._key(b)] = b

    def _remove_free(self, b: _Block, small: bool, stream: int) -> None:
        pool = self._pool(small, stream)
        pool.pop(bisect.bisect_left(pool, (b.size, *self._key(b))))
        del self._blocks[self._key(b)]
        b.free = False

    def malloc(self, size: int, stream: int = 0, *, base: int | None = None) -> tuple[_Block, bool, int]:
        """Serve a request; returns its block, its pool (small or not) and its stream. Equal-size
        free blocks go by address, as BlockComparatorSize orders them; `base` is the address a
        new segment gets (a replay passes the recorded one), else one past every segment."""
        size = round_request_bytes(size_bytes=size)
        small = size <= SMALL_SIZE_BYTES
        pool = self._pool(small, stream)
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block = self._blocks[pool[i][1:]]
            self._remove_free(block, small, stream)
        else:
            seg_size = segment_bytes(size_bytes=size)
            base = self._end if base is None else base
            self._end = max(self._end, base + seg_size)
            self.segments.append(seg_size)
            self.bases.append(base)
            self.reserved += seg_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            block = _Block(segment=len(self.segments) - 1, offset=0, size=seg_size, free=False)
        remaining = block.size - size
        if remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_SIZE_BYTES:
            rest = _Block(segment=block.segment, offset=block.offset + size, size=remaining, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._add_free(rest, small, stream)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block, small, stream

    def free(self, handle: tuple[_Block, bool, int]) -> None:
        block, small, stream = handle
        self.allocated -= block.size
        for nb in (block.prev, block.next):
            if nb is not None and nb.free:
                self._remove_free(nb, small, stream)
                if nb is block.prev:
                    nb.size += block.size
                    nb.next = block.next
                    if block.next is not None:
                        block.next.prev = nb
                    block = nb
                else:
                    block.size += nb.size
                    block.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = block
        self._add_free(block, small, stream)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): every segment that is one free block goes back to CUDA."""
        for key, pool in self._free.items():
            keep = []
            for entry in pool:
                b = self._blocks[entry[1:]]
                if b.offset == 0 and b.next is None and b.size == self.segments[b.segment]:
                    del self._blocks[entry[1:]]
                    self.reserved -= b.size
                    self.segments[b.segment] = 0
                else:
                    keep.append(entry)
            self._free[key] = keep


def replay(events: list[tuple[str, int, int, int]]) -> CachingAllocator:
    """Replay a recorded history: (action, address, size, stream) with the actions of
    torch.cuda.memory._snapshot()'s device trace; `alloc` and `free_completed` drive the model (a
    block returns to its pool once its stream's pending uses are done), a run of `segment_free`
    (the program called empty_cache) releases every wholly free segment; the rest is ignored."""
    alloc = CachingAllocator()
    live: dict[int, tuple[_Block, bool, int]] = {}
    previous = ""
    base = None  # the address of the segment the recorded allocator just reserved
    for action, addr, size, stream in events:
        if action == "segment_alloc":
            base = addr
        elif action == "alloc":
            live[addr] = alloc.malloc(size, stream, base=base)
            base = None
        elif action == "free_completed" and addr in live:
            alloc.free(live.pop(addr))
        elif action == "segment_free" and previous != "segment_free":
            alloc.empty_cache()
        previous = action
    return alloc
