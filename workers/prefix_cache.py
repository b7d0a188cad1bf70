"""KV caches kept by token prefix, for reuse across requests (the hf backend).

An entry is the per-layer (key, value) tensors of one token sequence, batch 1.
Lookups find the entry sharing the longest common prefix (LCP) with a new request
through a hash chain over 16-token blocks (as vLLM's prefix cache does), then
finish the match token by token inside the last block, so a lookup costs
O(len/16) dict probes, not a scan of every entry. A hit is served by slicing
(a view, no copy). An entry's tensors are the first positions of a cache
buffer that may have room after them; a caller that writes on in that buffer
from position n first drops the entries that reach past n (``drop_beyond``),
so every entry's view keeps the KV of its own ids. Memory is bounded by a
token budget with LRU eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
BLOCK = 16


def _block_hashes(ids: list[int] | tuple[int, ...]) -> list[int]:
    out, h = [], 0
    for b in range(len(ids) // BLOCK):
        h = hash((h, tuple(ids[b * BLOCK : (b + 1) * BLOCK])))
        out.append(h)
    return out


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: KV


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, int] = {}  # block-chain hash -> entry id
        self._by_buffer: dict[int, set[int]] = {}  # address of an entry's first key tensor -> entry ids
        self._next_id = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> tuple[int, KV | None, int | None]:
        """(matched length, KV sliced to it, entry id) for the longest cached prefix of ``ids``."""
        hashes = _block_hashes(ids)
        for b in range(len(hashes) - 1, -1, -1):
            eid = self._index.get(hashes[b])
            entry = self._entries.get(eid) if eid is not None else None
            if entry is None:
                continue
            n = (b + 1) * BLOCK
            if tuple(ids[:n]) != entry.ids[:n]:  # hash collision guard
                continue
            limit = min(len(ids), len(entry.ids))
            while n < limit and ids[n] == entry.ids[n]:
                n += 1
            self._entries.move_to_end(eid)
            return n, [(k[:, :, :n], v[:, :, :n]) for k, v in entry.kv], eid
        return 0, None, None

    def put(self, ids: list[int], kv: KV, replaces: int | None = None) -> None:
        """Store the KV of ``ids``; drop ``replaces`` if it is a prefix of ``ids`` (now redundant)."""
        if len(ids) < BLOCK or len(ids) > self.max_tokens:
            return
        if replaces is not None and replaces in self._entries:
            old = self._entries[replaces]
            if len(old.ids) <= len(ids) and tuple(ids[: len(old.ids)]) == old.ids:
                self._drop(replaces)
        eid = self._next_id
        self._next_id += 1
        self._entries[eid] = _Entry(tuple(ids), kv)
        self._by_buffer.setdefault(kv[0][0].data_ptr(), set()).add(eid)
        self.tokens += len(ids)
        for h in _block_hashes(ids):
            self._index[h] = eid
        while self.tokens > self.max_tokens and self._entries:
            self._drop(next(iter(self._entries)))

    def drop_beyond(self, buffer: int, n: int) -> None:
        """Drop the entries in the KV buffer at address ``buffer`` that reach past position ``n``.

        For a caller about to write into that buffer from ``n`` on (``HFWorker._claim_hit_buffer``): those
        entries' views would see the new positions instead of their own.
        """
        for eid in [e for e in self._by_buffer.get(buffer, ()) if len(self._entries[e].ids) > n]:
            self._drop(eid)

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        ptr = entry.kv[0][0].data_ptr()
        self._by_buffer[ptr].discard(eid)
        if not self._by_buffer[ptr]:
            del self._by_buffer[ptr]
        self.tokens -= len(entry.ids)
        for h in _block_hashes(entry.ids):
            if self._index.get(h) == eid:
                del self._index[h]

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._by_buffer.clear()
        self.tokens = 0
