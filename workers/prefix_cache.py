"""KV caches kept by token prefix, for reuse across requests (the hf backend).

An entry is the per-layer (key, value) tensors of one token sequence, batch 1.
Lookups find the entry sharing the longest common prefix (LCP) with a new request
through a hash chain over 16-token blocks (as vLLM's prefix cache does), then
finish the match token by token inside the last block, so a lookup costs
O(len/16) dict probes, not a scan of every entry. Ids are numpy arrays and the
chain hashes are computed vectorised (a random-weight polynomial hash, prefix sums
taken at block ends), so a 32k-token lookup or insertion costs a few C-speed passes
over the ids, not thousands of Python-level hashes; a hash never decides a match
alone (the ids are compared). A hit is served by slicing (a view, no copy). An
entry's tensors are the first positions of a cache buffer that may have room after
them; a caller that writes on in that buffer from position n first drops the
entries that reach past n (``drop_beyond``), so every entry's view keeps the KV of
its own ids. Memory is bounded by a token budget with LRU eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
BLOCK = 16

#: One random odd 64-bit weight per position: the chain hash of a prefix is ``sum((id + 1) * weight)`` over
#: its positions, modulo 2**64 (numpy's unsigned overflow). Grown on demand in fixed seeded chunks, so the
#: weights of a position never depend on the order engines (threads) grew them in.
_weights = np.empty(0, dtype=np.uint64)
_CHUNK = 1 << 16


def _position_weights(n: int) -> np.ndarray:
    global _weights
    w = _weights
    if n > len(w):
        more = [np.random.default_rng(c).integers(0, np.iinfo(np.uint64).max, _CHUNK, dtype=np.uint64,
                                                  endpoint=True) | np.uint64(1)
                for c in range(len(w) // _CHUNK, -(-n // _CHUNK))]
        w = _weights = np.concatenate([w, *more])
    return w[:n]


def block_hashes(ids: np.ndarray, known: list[int] | None = None) -> list[int]:
    """The chain hash of each whole 16-token block prefix of ``ids`` (block b: its first (b + 1) x 16 ids).

    ``known``: the hashes of a prefix of ``ids`` (its first ``len(known)`` blocks), computed before: the
    hash is a prefix sum, so only the blocks after them are hashed (a finished generation extends its
    prompt's hashes by the generated blocks instead of hashing the whole context again).
    """
    known = known or []
    s, n = len(known) * BLOCK, len(ids) // BLOCK * BLOCK
    if n <= s:
        return known[: n // BLOCK]
    terms = (ids[s:n].astype(np.uint64) + np.uint64(1)) * _position_weights(n)[s:]
    sums = terms.reshape(-1, BLOCK).sum(1, dtype=np.uint64).cumsum(dtype=np.uint64)
    if known:
        sums += np.uint64(known[-1])  # modulo 2**64, as the sums themselves
    return known + sums.tolist()


def as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    """``ids`` as the cache's key type: a 1-D int64 numpy array (no copy when it is one)."""
    return np.asarray(ids, dtype=np.int64)


@dataclass
class _Entry:
    ids: np.ndarray
    hashes: list[int]
    kv: KV


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, int] = {}  # block-chain hash -> entry id (possibly of a dropped entry)
        self._by_buffer: dict[int, set[int]] = {}  # address of an entry's first key tensor -> entry ids
        self._next_id = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: np.ndarray, hashes: list[int] | None = None) -> tuple[int, KV | None, int | None]:
        """(matched length, KV sliced to it, entry id) for the longest cached prefix of ``ids``.

        ``hashes``: ``block_hashes(ids)`` when the caller has them (it passes the same to ``put``).
        """
        ids = as_ids(ids)
        hashes = block_hashes(ids, hashes)
        for b in range(len(hashes) - 1, -1, -1):
            eid = self._index.get(hashes[b])
            entry = self._entries.get(eid) if eid is not None else None
            if entry is None:
                continue
            n = (b + 1) * BLOCK
            if not np.array_equal(ids[:n], entry.ids[:n]):  # hash collision guard
                continue
            limit = min(len(ids), len(entry.ids))
            differ = np.flatnonzero(ids[n:limit] != entry.ids[n:limit])
            n = n + int(differ[0]) if len(differ) else limit
            self._entries.move_to_end(eid)
            return n, [(k[:, :, :n], v[:, :, :n]) for k, v in entry.kv], eid
        return 0, None, None

    def put(self, ids: np.ndarray, kv: KV, replaces: int | None = None, hashes: list[int] | None = None) -> int | None:
        """Store the KV of ``ids``; drop ``replaces`` if it is a prefix of ``ids`` (now redundant).

        Returns the new entry's id (``None`` when ``ids`` is too short or too long to keep), which
        a caller that extends the same sequence later passes as ``replaces``. ``hashes``: the
        ``block_hashes`` of ``ids`` or of a prefix of it, when the caller has them: only the blocks
        after them are hashed, and only for a sequence the cache keeps.
        """
        ids = as_ids(ids)
        if len(ids) < BLOCK or len(ids) > self.max_tokens:
            return None
        if replaces is not None and replaces in self._entries:
            old = self._entries[replaces]
            if len(old.ids) <= len(ids) and np.array_equal(ids[: len(old.ids)], old.ids):
                self._drop(replaces)
        eid = self._next_id
        self._next_id += 1
        hashes = block_hashes(ids, hashes)
        self._entries[eid] = _Entry(ids, hashes, kv)
        self._by_buffer.setdefault(kv[0][0].data_ptr(), set()).add(eid)
        self.tokens += len(ids)
        self._index.update(dict.fromkeys(hashes, eid))
        while self.tokens > self.max_tokens and self._entries:
            self._drop(next(iter(self._entries)))
        return eid if eid in self._entries else None

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
        # The index keeps the dropped entry's hashes (a lookup skips ids no longer cached): removing them one by
        # one is a Python loop over the whole sequence, O(context) per call. It is rebuilt from the live entries
        # when stale keys outnumber live ones, which costs C-speed dict updates, amortised over the drops.
        if len(self._index) > 2 * self.tokens // BLOCK + 1024:
            self._reindex()

    def _reindex(self) -> None:
        self._index = {}
        for eid, entry in self._entries.items():  # least recently used first: the most recent wins a shared block
            self._index.update(dict.fromkeys(entry.hashes, eid))

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._by_buffer.clear()
        self.tokens = 0
