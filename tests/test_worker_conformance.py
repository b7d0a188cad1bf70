"""The Worker protocol, backend by backend, on the real arith small model.

Reference numbers come from plain transformers (``AutoModelForCausalLM`` in fp32):
every backend must agree with it, and so with every other backend.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.prompting import prompt_ids, to_messages
from tests.conftest import arith_model
from workers.protocol import Fusion, GenParams, WorkerError
from workers.sampling import fuse, sampling_probs

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROBLEMS = ["53 + 51 - 6 + 20", "12 + 34 - 5", "88 - 23 + 41 - 7", "19 + 19 + 19", "70 - 33 + 12 + 5 - 9"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(arith_model("small"))


@pytest.fixture(scope="module")
def ref():
    return AutoModelForCausalLM.from_pretrained(arith_model("small"), dtype=torch.float32).eval()


def ids_for(tok, problem: str) -> list[int]:
    return prompt_ids(tok, to_messages(problem))


def ref_greedy(ref, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)


async def test_greedy_matches_transformers(small_worker, tok, ref):
    ids = ids_for(tok, PROBLEMS[0])
    g = await small_worker.generate(ids, GenParams(max_tokens=80))
    assert g.token_ids == ref_greedy(ref, ids, 80)[: len(g.token_ids)]
    assert g.finish_reason == "eos" and "\\boxed{" in g.text and g.prompt_tokens == len(ids)


async def test_stop_strings_and_max_tokens(small_worker, tok):
    ids = ids_for(tok, PROBLEMS[1])
    g = await small_worker.generate(ids, GenParams(max_tokens=50, stop=["\n\n"]))
    assert g.finish_reason == "stop" and g.stop_reason == "\n\n" and "\n\n" not in g.text and g.text
    kept = await small_worker.generate(ids, GenParams(max_tokens=50, stop=["\n\n"], include_stop_str_in_output=True))
    assert kept.text == g.text + "\n\n"
    short = await small_worker.generate(ids, GenParams(max_tokens=3))
    assert short.finish_reason == "length" and len(short.token_ids) == 3


async def test_prefix_is_served_from_cache(small_worker, tok):
    ids = ids_for(tok, PROBLEMS[2] + " + 1 + 2 + 3 + 4 + 5")
    first = await small_worker.generate(ids, GenParams(max_tokens=12, stop=["\n\n"]))
    second = await small_worker.generate(ids + first.token_ids, GenParams(max_tokens=12, stop=["\n\n"]))
    assert second.cached_prompt_tokens >= 16


async def test_seeded_sampling_is_reproducible(small_worker, tok):
    ids = ids_for(tok, PROBLEMS[3])
    p = GenParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=7)
    a, b = await small_worker.generate(ids, p), await small_worker.generate(ids, p)
    assert a.token_ids == b.token_ids


async def test_score_and_next_token_logprobs_match_transformers(small_worker, tok, ref):
    ids = ids_for(tok, PROBLEMS[4])
    cont = tok.encode("70 - 33 = 37\n\n", add_special_tokens=False)
    lp = ref_logprobs(ref, ids + cont)
    s = await small_worker.score(ids, cont, top_k=3, full_next=True)
    want = [float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)]
    assert s.logprobs == pytest.approx(want, abs=1e-3)
    assert len(s.top) == len(cont) and all(len(t) == 3 for t in s.top)
    assert max(range(len(s.next_logprobs)), key=s.next_logprobs.__getitem__) == int(lp[-1].argmax())
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    nxt = await small_worker.next_token_logprobs(ids + cont, digits, top_k=5)
    assert [nxt.candidates[d] for d in digits] == pytest.approx([float(lp[-1, d]) for d in digits], abs=1e-3)
    want_top = lp[-1].topk(5)
    assert list(nxt.top) == want_top.indices.tolist()  # most likely first
    assert list(nxt.top.values()) == pytest.approx(want_top.values.tolist(), abs=1e-3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_score_returns_the_model_tokens_from_the_same_pass(small_worker, tok, ref, temperature):
    """``sampled``: the argmax (greedy) or a seeded draw at each continuation position and after the last."""
    ids = ids_for(tok, PROBLEMS[4])
    cont = tok.encode("70 - 33 = 37\n\n", add_special_tokens=False)
    lp = ref_logprobs(ref, ids + cont)[len(ids) - 1 :]
    params = GenParams(temperature=temperature, seed=7)
    s = await small_worker.score(ids, cont, sample=params)
    assert s.dists is None and s.next_logprobs is None and len(s.sampled) == len(cont) + 1
    if temperature == 0:
        assert s.sampled == lp.argmax(-1).tolist()
    else:
        assert all(lp[j, t] > -30 for j, t in enumerate(s.sampled))  # drawn from each row's support
        assert (await small_worker.score(ids, cont, sample=params)).sampled == s.sampled  # seeded


async def test_sampling_reads_are_the_sampling_distribution_at_a_few_tokens(small_worker, tok, ref):
    """What lossless speculative sampling reads instead of rows: p at the continuation, draws, candidates."""
    ids = ids_for(tok, PROBLEMS[4])
    cont = tok.encode("70 - 33 = 37\n\n", add_special_tokens=False)
    params = GenParams(temperature=0.8, top_k=20, seed=11)
    want = sampling_probs(ref_logprobs(ref, ids + cont)[len(ids) - 1 :], 0.8, 20).log()
    candidates = [[t, (t + 1) % 400, 3] for t in cont]
    s = await small_worker.score(ids, cont, sample=params, draws=5, candidates=candidates)
    assert s.dists is None and s.next_logprobs is None
    assert s.sample_logprobs == pytest.approx([float(want[j, t]) for j, t in enumerate(cont)], abs=1e-3)
    assert len(s.draws) == len(cont) + 1 and all(len(d) == 5 for d in s.draws)
    for j, (d, lps) in enumerate(zip(s.draws, s.draw_logprobs)):
        assert lps == pytest.approx([float(want[j, t]) for t in d], abs=1e-3) and min(lps) > -math.inf  # in support
    for j, (c, lps) in enumerate(zip(candidates, s.candidate_logprobs)):
        assert [max(x, -1e9) for x in lps] == pytest.approx([max(float(want[j, t]), -1e9) for t in c], abs=1e-3)
    assert (await small_worker.score(ids, cont, sample=params)).sampled == s.sampled  # draws come after sampled
    after = await small_worker.score([*ids, *cont], [], sample=params, draws=3, candidates=[[5]])
    assert len(after.draws) == 1 and len(after.candidate_logprobs) == 1 and after.sample_logprobs == []
    with pytest.raises(WorkerError, match="temperature > 0"):
        await small_worker.score(ids, cont, sample=GenParams(), draws=2)
    with pytest.raises(WorkerError, match="positions"):
        await small_worker.score(ids, cont[:2], sample=params, candidates=[[1]] * 4)


@pytest.mark.parametrize("kind, temperature", [("linear", 0.0), ("log-linear", 0.0), ("linear", 0.8)])
async def test_fused_reads_come_from_the_mixture_of_two_rows(small_worker, tok, ref, kind, temperature):
    """Reflective Verification's read: a draft scored twice, verified on the fused rows inside the worker."""
    ids = ids_for(tok, PROBLEMS[4])
    draft = tok.encode("70 - 33 = 37\n\n", add_special_tokens=False)
    cont = [*draft, *tok.encode("[BACK]", add_special_tokens=False), *draft]
    fusion = Fusion(offset=len(cont) - len(draft), alpha=0.3, kind=kind)
    lp = ref_logprobs(ref, ids + cont)[len(ids) - 1 :]  # a row per continuation token and the one after
    f = fuse(lp[: len(draft) + 1], lp[fusion.offset :], 0.3, kind)
    params = GenParams(temperature=temperature, top_k=20, seed=5)
    s = await small_worker.score(ids, cont, sample=params, draws=4 if temperature else 0, fuse=fusion)
    assert s.dists is None and s.next_logprobs is None and len(s.sampled) == len(draft) + 1
    assert s.logprobs == pytest.approx([float(lp[j, t]) for j, t in enumerate(cont)], abs=1e-3)  # plain
    if temperature == 0:
        assert s.sampled == f.argmax(-1).tolist()
    else:
        want = sampling_probs(f, temperature, 20).log()
        plain = sampling_probs(lp[: len(draft)], temperature, 20).log()
        assert max(abs(float(want[j, t] - plain[j, t])) for j, t in enumerate(draft)) > 0.01  # the fusion shows
        assert s.sample_logprobs == pytest.approx([float(want[j, t]) for j, t in enumerate(draft)], abs=1e-3)
        for j, (d, lps) in enumerate(zip(s.draws, s.draw_logprobs)):
            assert lps == pytest.approx([float(want[j, t]) for t in d], abs=1e-3)
    with pytest.raises(WorkerError, match="sample params"):
        await small_worker.score(ids, cont, fuse=fusion)
    with pytest.raises(WorkerError, match="beyond"):
        await small_worker.score(ids, draft, sample=params, fuse=Fusion(offset=len(draft) + 1, alpha=0.3))


async def test_generation_returns_the_sampling_logprob_of_each_token_as_drawn(small_worker, tok):
    """``sample_logprobs``: q(x) of each drawn token, what lossless verification reads from a draft."""
    ids = ids_for(tok, PROBLEMS[1])
    params = GenParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=3, sample_logprobs=True, logprobs=2)
    g = await small_worker.generate(ids, params)
    s = await small_worker.score(ids, g.token_ids, sample=params)
    assert g.sample_logprobs == pytest.approx(s.sample_logprobs, abs=1e-3) and max(g.sample_logprobs) <= 0
    assert all(len(x.top) == 2 for x in g.logprobs)  # the top-k asked, though the engine read whole rows
    plain = await small_worker.generate(ids, params.model_copy(update={"sample_logprobs": False}))
    assert plain.sample_logprobs is None and plain.token_ids == g.token_ids  # the same draws either way
    assert (await small_worker.generate(ids, GenParams(max_tokens=4, sample_logprobs=True))).sample_logprobs is None


async def test_generation_logprobs_agree_with_score(small_worker, tok):
    ids = ids_for(tok, PROBLEMS[0])
    g = await small_worker.generate(ids, GenParams(max_tokens=10, logprobs=2))
    s = await small_worker.score(ids, g.token_ids)
    assert [x.logprob for x in g.logprobs] == pytest.approx(s.logprobs, abs=1e-3)
    assert all(x.token_id == t and len(x.top) >= 2 for x, t in zip(g.logprobs, g.token_ids))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_a_generation_stops_right_after_the_first_token_its_model_doubts(small_worker, tok, temperature):
    """``GenParams.stop_below``: the same tokens as without it, up to and with the first one at whose position
    the model's top-1 probability is under the threshold; finish "length"; counted in the stats. Rows that stop
    leave a batch whose other rows go on unchanged."""
    params = dict(temperature=temperature, seed=7)
    prompts = [ids_for(tok, p) for p in PROBLEMS[:3]]
    refs = [await small_worker.generate(i, GenParams(max_tokens=12, logprobs=1, **params)) for i in prompts]
    top1 = [[math.exp(max(lp.logprob, *lp.top.values())) for lp in r.logprobs] for r in refs]
    # the least sure of the first 11 tokens of the first prompt (its first occurrence: every token before it is
    # surer), and a threshold between its probability and the lowest one before it
    stop_at = min(range(11), key=lambda i: top1[0][i])
    threshold = (top1[0][stop_at] + min(top1[0][:stop_at], default=1.0)) / 2
    before = (await small_worker.stats()).confidence_stops
    got = await asyncio.gather(*(small_worker.generate(i, GenParams(max_tokens=12, stop_below=threshold, **params))
                                 for i in prompts))
    assert got[0].token_ids == refs[0].token_ids[: stop_at + 1] and got[0].finish_reason == "length"
    assert got[0].text == tok.decode(got[0].token_ids, skip_special_tokens=True)
    stops = 0
    for r, p, g in zip(refs, top1, got):
        n = next((i + 1 for i, q in enumerate(p) if q < threshold), len(p))
        assert g.token_ids == r.token_ids[:n]
        stops += n < len(r.token_ids)  # a doubted last token ends by its own reason (EOS, length) first
    assert (await small_worker.stats()).confidence_stops - before == stops


async def test_concurrent_requests_equal_sequential(small_worker, tok):
    prompts = [ids_for(tok, p) for p in PROBLEMS * 3]
    together = await asyncio.gather(*(small_worker.generate(i, GenParams(max_tokens=60)) for i in prompts))
    for i, g in zip(prompts[:5], together[:5]):
        alone = await small_worker.generate(i, GenParams(max_tokens=60))
        assert alone.token_ids == g.token_ids


async def test_info_and_stats(small_worker):
    info = await small_worker.info()
    assert info.vocab_size > 400 and len(info.vocab_fingerprint) == 16 and info.eos_token_id is not None
    st = await small_worker.stats()
    assert st.requests > 0 and st.generated_tokens > 0 and st.cached_prompt_tokens > 0


async def test_empty_prompt_is_a_clear_error(small_worker):
    with pytest.raises((WorkerError, ValueError)):
        await small_worker.generate([], GenParams(max_tokens=4))
