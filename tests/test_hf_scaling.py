"""The hf backend at scale: logits only where read, a KV cache that grows in place, speculation inside it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workers.protocol import GenParams


async def test_logits_only_for_the_positions_a_request_reads(engines: Any) -> None:
    worker = engines("hf", "small")
    seen: list[int] = []
    forward = worker._run_model  # the engine's one forward pass (the lean runner or transformers')

    def recording(*args: Any, **kwargs: Any) -> Any:
        logits = forward(*args, **kwargs)
        seen.append(logits.shape[1])
        return logits

    worker._run_model = recording
    try:
        prompt = [5 + (i % 200) for i in range(700)]  # a long uncached prompt
        await worker.generate(prompt, GenParams(max_tokens=1))
        assert seen[0] == 1  # a 700-token prefill reads one row of logits, not 700
        seen.clear()
        s = await worker.score(prompt[:600], prompt[600:], sample=GenParams())
        assert len(s.logprobs) == 100 and len(s.sampled) == 101
        assert seen == [101]  # the continuation and the position after it
    finally:
        worker._run_model = forward


@pytest.mark.parametrize("method", ["draft", "ngram"])
async def test_speculation_inside_the_hf_worker_keeps_greedy_output(engines: Any, method: str) -> None:
    """Draft-model and n-gram proposals verified inside batched decode rounds: same greedy text, fewer passes."""
    from orchestrator.config import SpeculativeConfig
    from orchestrator.prompting import prompt_ids, to_messages
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker

    plain = engines("hf", "large")
    spec = SpeculativeConfig(method=method, num_speculative_tokens=4,
                             model=arith_model("small") if method == "draft" else None)
    fast = HFWorker(arith_model("large"), speculative=spec)
    try:
        problems = ["53 + 51 - 6 + 20", "12 + 7 - 3", "40 - 12 + 5 + 9", "81 - 27 + 14"]
        prompts = [prompt_ids(plain.tokenizer, to_messages(p)) for p in problems]
        params = GenParams(max_tokens=120)
        want = await asyncio.gather(*(plain.generate(p, params) for p in prompts))
        got = await asyncio.gather(*(fast.generate(p, params) for p in prompts))  # batched together
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        stats = await fast.stats()
        assert stats.spec_proposed_tokens > 0
        if method == "draft":
            assert stats.spec_accepted_tokens > 0.5 * stats.spec_proposed_tokens
            assert sum(g.forward_passes for g in got) < sum(w.forward_passes for w in want)
    finally:
        await fast.close()


def test_growing_cache_layer_appends_in_place_and_never_writes_into_cached_kv() -> None:
    import torch

    from workers.hf_backend import GrowingLayer, growing_cache

    cached = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))]
    before = cached[0][0].clone()
    cache = growing_cache(cached)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    keys = [cached[0][0]]
    buffers = set()
    for _ in range(GrowingLayer.HEADROOM + 10):  # past the first buffer's room: it grows once
        new = torch.randn(1, 2, 1, 4)
        k, _ = layer.update(new, new)
        keys.append(new)
        buffers.add(layer._k.data_ptr())
    assert torch.equal(k, torch.cat(keys, dim=-2))  # what concatenation would give
    assert len(buffers) == 2 and layer.get_seq_length() == 5 + GrowingLayer.HEADROOM + 10
    assert torch.equal(cached[0][0], before)  # the cached entry it started from is untouched


async def test_a_finished_row_is_answered_while_its_round_decodes(engines: Any) -> None:
    """Continuous batching: a generation that finishes is returned at once, not when its round ends. The engine
    used to answer rows only then, up to 4 x ``round_steps`` steps later when nothing else waits, so a caller's
    next request waited on its batch's longest row."""
    from orchestrator.prompting import prompt_ids, to_messages

    worker = engines("hf", "arith2/small")  # its chains run ~250 tokens
    ids = [prompt_ids(worker.tokenizer, to_messages(p)) for p in ("53 + 51 - 6 + 20 - 99", "12 + 34")]
    long = asyncio.create_task(worker.generate(ids[0], GenParams(max_tokens=300)))
    while worker._stats.forward_passes < 3:  # the long one is decoding
        await asyncio.sleep(0.005)
    before = (await worker.stats()).forward_passes
    short = await worker.generate(ids[1], GenParams(max_tokens=2))
    passes = (await worker.stats()).forward_passes - before
    # it joins at the next round boundary (<= round_steps), then one prefill and one decode step (the old engine: 79)
    assert len(short.token_ids) == 2 and passes <= 2 * worker.round_steps and not long.done(), passes
    assert len((await long).token_ids) > 4 * worker.round_steps


def lookup_reference(seq: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup as its definition reads: the latest earlier occurrence of the longest matching tail."""
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == seq[-n:]:
                return seq[start + n : start + n + k]
    return []


def test_vectorised_ngram_lookup_equals_its_definition_as_rows_grow() -> None:
    """Random rows over small vocabularies (many partial matches), extended token by token as in decoding."""
    import random

    from workers.hf_backend import _Request
    from workers.hf_speculation import NgramProposer

    rng = random.Random(0)
    for _ in range(300):
        n_min = rng.randint(1, 3)
        n_max = rng.randint(n_min, 5)
        proposer = NgramProposer(rng.randint(1, 5), n_min, n_max)
        vocab = rng.randint(1, 6)
        row = _Request("generate", [rng.randrange(vocab) for _ in range(rng.randint(1, 30))], None, None,
                       params=GenParams(max_tokens=40))
        for _ in range(rng.randint(1, 20)):
            k = min(proposer.k, row.params.max_tokens - len(row.generated) - 1)
            want = lookup_reference(row.ids + row.generated, k, n_min, n_max) if k > 0 else []
            assert proposer.propose([row]) == [want]
            row.generated.append(rng.randrange(vocab))
