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


async def test_a_call_that_extends_a_cached_chain_writes_in_place_and_loses_nothing() -> None:
    """Each call used to copy the whole cached prefix into a new buffer (O(context) per call: at a few hundred
    tokens as much as a short verification's forward pass). A lone call now writes on in the buffer it hit when
    nobody else writes there, dropping the cached entries it overwrites; branches, rewinds and concurrent calls
    from one prefix must still see exactly what a worker without any cache computes."""
    from orchestrator.prompting import prompt_ids, to_messages
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker

    worker, plain = HFWorker(arith_model("arith2/small")), HFWorker(arith_model("arith2/small"), kv_cache_tokens=0)
    try:
        prompt = prompt_ids(worker.tokenizer, to_messages("53 + 51 - 6 + 20 - 99"))
        chain = prompt + (await worker.generate(prompt, GenParams(max_tokens=80))).token_ids
        n = len(prompt)
        buffers = set(worker.cache._by_buffer)
        calls = [(n + 10, 8), (n + 18, 8), (n + 14, 8), (n + 30, 20), (n + 5, 40)]  # on, on, rewind, on, far back
        for start, k in calls:
            got, want = await worker.score(chain[:start], chain[start : start + k]), \
                await plain.score(chain[:start], chain[start : start + k])
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert set(worker.cache._by_buffer) == buffers  # every call went on in the chain's one buffer
        branch = chain[: n + 20] + [chain[n + 25]] * 5  # a different continuation of a cached prefix
        reads = [(chain[: n + 20], chain[n + 20 : n + 28]), (branch[:-3], branch[-3:]),
                 (chain[: n + 40], chain[n + 40 : n + 44])]
        for a, b in reads + reads[::-1]:  # one at a time: the branch overwrites the chain's positions, and back
            got, want = await worker.score(a, b), await plain.score(a, b)
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        tail = GenParams(max_tokens=30)
        got = await asyncio.gather(*(worker.score(a, b) for a, b in reads), worker.generate(chain[: n + 12], tail))
        want = await asyncio.gather(*(plain.score(a, b) for a, b in reads), plain.generate(chain[: n + 12], tail))
        for g, w in zip(got[:-1], want[:-1]):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert got[-1].token_ids == want[-1].token_ids == chain[n + 12 : n + 42]
        assert (await worker.generate(prompt, GenParams(max_tokens=80))).token_ids == chain[n:]
        # a generation still decoding owns its buffer: a call that hits its entry meanwhile must copy
        traced = GenParams(max_tokens=60, logprobs=0)
        decoding = asyncio.create_task(worker.generate(chain[: n + 5], traced))
        passes = worker._stats.forward_passes
        while worker._stats.forward_passes < passes + 3:
            await asyncio.sleep(0.002)
        got, want = await worker.score(chain[: n + 3], branch[-5:]), await plain.score(chain[: n + 3], branch[-5:])
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        got, want = await decoding, await plain.generate(chain[: n + 5], traced)
        assert got.token_ids == want.token_ids == chain[n + 5 : n + 65]
        assert [t.logprob for t in got.logprobs] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
    finally:
        await worker.close()
        await plain.close()


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


async def test_rows_that_leave_and_join_a_decode_batch_copy_only_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous batching without restacking: the engine used to take its batch apart whenever a row left and
    copy every row into a new one whenever a row joined, O(the whole batch's context) per change (10-13% of
    the large arith model's time at concurrency 16-32). A row that leaves now frees its slot, a row that joins
    is copied into a free one, and a batch mostly free is squeezed by one copy of its live rows; the tokens and
    log-probabilities stay those of a worker serving each request alone."""
    import workers.hf_backend as hf
    from orchestrator.prompting import prompt_ids, to_messages
    from tests.conftest import arith_model

    stacked: list[int] = []  # per stacking, how many rows brought KV of their own

    def counting(kvs: list, width: int, adopt: bool = False) -> Any:
        stacked.append(sum(kv is not None for kv in kvs))
        return stack(kvs, width, adopt)

    stack = hf.stack_kv
    monkeypatch.setattr(hf, "stack_kv", counting)
    worker = hf.HFWorker(arith_model("arith2/small"), threads=1)
    alone = hf.HFWorker(arith_model("arith2/small"), threads=1, kv_cache_tokens=0)
    try:
        ids = [prompt_ids(worker.tokenizer, to_messages(p)) for p in ("53 + 51 - 6 + 20 - 99", "12 + 34", "7 - 5")]
        params = [GenParams(max_tokens=n, logprobs=0) for n in (200, 120, 3, 40)]
        prompts = [ids[0], ids[0], ids[1], ids[2]]
        first = [asyncio.create_task(worker.generate(p, g)) for p, g in zip(prompts[:3], params[:3])]
        await first[2]  # a row left the batch; another joins while the first two decode
        joining = asyncio.create_task(worker.generate(prompts[3], params[3]))
        assert not first[0].done() and not first[1].done()
        got = await asyncio.gather(*first, joining)
        assert [len(g.token_ids) for g in got] == [200, 120, 3, 40]
        for g, p, gp in zip(got, prompts, params):
            want = await alone.generate(p, gp)
            assert g.token_ids == want.token_ids
            assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
        assert max(stacked) <= 1, stacked  # only a prefill's own row: no decoding row was stacked again
    finally:
        await worker.close()
        await alone.close()


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


async def test_specreason_decode_writes_specreason_text_with_speculation_in_the_large_worker() -> None:
    """``arith/specreason-decode`` (SpecReason+Decode): the large model's rewrites go through token-level SD
    inside its worker, which is lossless, so the text and the step decisions are ``arith/specreason``'s."""
    from orchestrator import Orchestrator, load_config

    problems = ["53 + 51 - 6 + 20", "30 - 25 + 37 + 5 - 25"]
    runs = {}
    for name in ("arith/specreason", "arith/specreason-decode"):
        orch = Orchestrator(load_config(name, ["sampling.max_tokens=160"]))
        try:
            results = await orch.asolve_batch(problems, concurrency=len(problems))
            stats = await orch.models["large"].worker.stats()
        finally:
            await orch.aclose()
        runs[name] = ([r.text for r in results], [[s.accepted for s in r.segments] for r in results], stats)
    plain, decode = runs["arith/specreason"], runs["arith/specreason-decode"]
    assert decode[:2] == plain[:2] and any(not a for steps in plain[1] for a in steps)  # some steps rewritten
    assert plain[2].spec_proposed_tokens == 0 and decode[2].spec_accepted_tokens > 0
