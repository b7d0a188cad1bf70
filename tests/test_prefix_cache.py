"""The hf backend's prefix cache: matches are real common prefixes, chains keep one entry, the index stays bounded."""

from __future__ import annotations

import random

import pytest
import torch

import numpy as np

from workers.prefix_cache import BLOCK, PrefixCache, block_hashes


def kv_of(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A one-layer KV whose key at position i holds ids[i]: a hit's slice shows which ids it was computed for."""
    keys = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [(keys, keys.clone())]


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_lookups_return_real_common_prefixes_and_find_the_longest_to_the_block() -> None:
    """Random sequences sharing prefixes (a small vocabulary, branches of one another), put and looked up."""
    rng = random.Random(0)
    cache = PrefixCache(max_tokens=10**6)
    stored: list[list[int]] = []
    for _ in range(300):
        base = rng.choice(stored) if stored and rng.random() < 0.8 else []
        cut = rng.randint(0, len(base))
        ids = base[:cut] + [rng.randrange(3) for _ in range(rng.randint(0, 70))]
        n, kv, eid = cache.lookup(ids)
        best = max((lcp(ids, s) for s in stored), default=0)
        assert n <= best and n >= best // BLOCK * BLOCK  # only puts so far: every block is indexed
        if kv is not None:
            assert kv[0][0].flatten().tolist() == ids[:n]  # the KV of these very ids
        if len(ids) >= BLOCK:
            stored.append(ids)
            cache.put(ids, kv_of(ids))
    assert len(cache) == len(stored)


def test_an_entry_extended_by_its_chain_is_replaced_and_dropped_entries_leave_the_index() -> None:
    cache = PrefixCache(max_tokens=10**6)
    chain = list(range(1000, 1000 + 40 * 64))
    source = None
    for end in range(64, len(chain) + 1, 64):  # each call extends the last
        n, _, hit = cache.lookup(chain[:end])
        assert hit == source and n == end - 64 if source is not None else n == 0
        source = cache.put(chain[:end], kv_of(chain[:end]), replaces=source)
    assert len(cache) == 1 and cache.tokens == len(chain)
    # dropping entries (a buffer taken over) leaves stale index keys behind, rebuilt once they outnumber live ones
    for i in range(200):
        ids = [7, i] + chain[: 16 * 40]
        eid = cache.put(ids, kv_of(ids))
        cache.drop_beyond(cache._entries[eid].kv[0][0].data_ptr(), 0)
    assert len(cache) == 1 and len(cache._index) <= 2 * cache.tokens // BLOCK + 1024
    assert cache.lookup(chain)[0] == len(chain)


def test_hashes_extended_from_a_prefix_are_the_hashes_of_the_whole() -> None:
    """A finished generation's entry extends its prompt's hashes by the generated blocks only."""
    ids = np.random.default_rng(1).integers(0, 131072, 5000)
    whole = block_hashes(ids)
    assert len(whole) == 5000 // BLOCK and len(set(whole)) == len(whole)
    for cut in (0, 15, 16, 17, 1000, 4999, 5000):
        assert block_hashes(ids, block_hashes(ids[:cut])) == whole
    assert block_hashes(ids[:100], whole) == whole[: 100 // BLOCK]  # known hashes beyond ids: its own prefix


def test_put_extends_a_prefix_hashes_and_hashes_nothing_it_does_not_keep(monkeypatch) -> None:
    """``put(hashes=...)`` takes the hashes of a prefix (a prompt's, for its finished generation) and hashes only
    the blocks after it; a sequence too long to keep is not hashed at all (a finished generation extended its
    prompt's hashes before the length check)."""
    import workers.prefix_cache as pc

    ids = np.random.default_rng(2).integers(0, 1000, 300)
    cache = PrefixCache(max_tokens=400)
    eid = cache.put(ids, kv_of(ids), hashes=block_hashes(ids[:100]))
    assert cache._entries[eid].hashes == block_hashes(ids) and cache.lookup(ids)[0] == 300
    hashed = []
    monkeypatch.setattr(pc, "block_hashes", lambda *a: hashed.append(a) or block_hashes(*a))
    long = np.random.default_rng(3).integers(0, 1000, 500)
    assert cache.put(long, kv_of(long), hashes=block_hashes(long[:100])) is None and hashed == []


async def test_a_generation_leaves_one_cache_entry_for_its_chain() -> None:
    """A generation stored its prompt's KV at prefill and prompt + output when it finished, and the first
    entry stayed: a chain of calls kept one redundant entry per call (31 for 30 calls of 8 tokens at 1k-32k
    tokens of context), charged in full to the token budget, so long chains were evicted early."""
    from orchestrator.prompting import prompt_ids, to_messages
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker
    from workers.protocol import GenParams

    worker = HFWorker(arith_model("arith2/small"))
    try:
        ids = list(prompt_ids(worker.tokenizer, to_messages("53 + 51 - 6 + 20 - 99")))
        for _ in range(4):  # the next call goes on from what the last one wrote
            ids = ids + (await worker.generate(ids, GenParams(max_tokens=12))).token_ids
            assert len(worker.cache) == 1 and worker.cache.tokens == len(ids) - 1  # the last token has no KV yet
    finally:
        await worker.close()


def test_inverse_cdf_draws_follow_the_row_and_never_pick_a_zero() -> None:
    from workers.sampling import draw

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.5, 0.0, 0.5]])
    got = draw(probs, 40_000, g)
    assert got.shape == (2, 40_000)
    for row, p in zip(got, probs):
        freq = torch.bincount(row, minlength=4).double() / row.numel()
        assert freq.tolist() == pytest.approx(p.tolist(), abs=0.01)
        assert bool((p[row] > 0).all())
    big = torch.softmax(torch.randn(131_072, generator=g) * 4, -1)  # a vocabulary-sized row
    tokens = draw(big, 20_000, g)
    assert float(big[tokens].log().mean()) == pytest.approx(float((big * big.log()).sum()), abs=0.1)  # -entropy
