"""The vLLM backend against transformers on the arith small model.

One engine serves the whole module (engine start-up costs tens of seconds on CPU);
the n-gram speculation test starts a second one. Engines run eagerly here: torch
compilation would double start-up and changes no result.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from workers.protocol import GenParams  # noqa: E402
from workers.vllm_backend import VLLMWorker  # noqa: E402

SMALL = Path(__file__).resolve().parents[1] / "evals" / "arith" / "models" / "small"
LARGE = SMALL.parent / "large"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EAGER = {"enforce_eager": True}

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not (SMALL / "config.json").exists(), reason=f"arith small model not trained yet ({SMALL})"),
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SMALL)


@pytest.fixture(scope="module")
def hf():
    return AutoModelForCausalLM.from_pretrained(SMALL, dtype=torch.float32).eval()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker():
    w = VLLMWorker.create(str(SMALL), max_model_len=1024, engine_args=EAGER)
    yield w
    await w.close()


def chat(tok, problem: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}],
                                        add_generation_prompt=True, return_dict=False))


def hf_greedy(hf, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """Row i: log-distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


async def test_generate_greedy_matches_transformers(worker, hf, tok):
    ids = chat(tok, "53 + 51 - 6")
    g = await worker.generate(ids, GenParams(max_tokens=120))
    assert g.token_ids == hf_greedy(hf, tok, ids, 120)
    assert g.finish_reason == "eos" and g.token_ids[-1] == tok.eos_token_id
    assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
    assert "\\boxed{" in g.text
    assert g.prompt_tokens == len(ids)


async def test_length_limit(worker, tok):
    g = await worker.generate(chat(tok, "12 + 30"), GenParams(max_tokens=3))
    assert g.finish_reason == "length" and len(g.token_ids) == 3


async def test_stop_strings(worker, tok):
    ids = chat(tok, "53 + 51 - 6")
    full = await worker.generate(ids, GenParams(max_tokens=120))
    first_step = full.text.split("\n\n")[0]
    g = await worker.generate(ids, GenParams(max_tokens=120, stop=["\n\n"]))
    assert (g.finish_reason, g.stop_reason, g.text) == ("stop", "\n\n", first_step)
    g = await worker.generate(ids, GenParams(max_tokens=120, stop=["\n\n"], include_stop_str_in_output=True))
    assert g.text == first_step + "\n\n"


async def test_seeded_sampling_is_reproducible(worker, tok):
    ids = chat(tok, "87 - 19 + 44")

    async def sample(seed: int) -> list[int]:
        return (await worker.generate(ids, GenParams(max_tokens=60, temperature=1.5, seed=seed))).token_ids

    first = await sample(7)
    assert await sample(7) == first
    assert any([await sample(s) != first for s in (8, 9, 10)])


async def test_score_matches_transformers(worker, hf, tok):
    prefix = chat(tok, "64 - 27 + 18")
    cont = (await worker.generate(prefix, GenParams(max_tokens=40))).token_ids
    ref = hf_logprobs(hf, prefix + cont)
    rows = ref[len(prefix) - 1 : len(prefix) - 1 + len(cont)]
    s = await worker.score(prefix, cont, top_k=3, entropies=True, full_dists=True, full_next=True)
    expected = rows.gather(1, torch.tensor(cont)[:, None])[:, 0]
    assert max(abs(a - b) for a, b in zip(s.logprobs, expected.tolist())) < 1e-3
    assert len(s.logprobs) == len(cont) and s.prompt_tokens == len(prefix)
    for top, row in zip(s.top, rows):
        assert list(top) == row.topk(3).indices.tolist()
    entropies = -(rows.exp() * rows).sum(-1)
    assert max(abs(a - b) for a, b in zip(s.entropies, entropies.tolist())) < 1e-3
    assert torch.allclose(torch.tensor(s.dists), rows, atol=1e-3)
    assert torch.allclose(torch.tensor(s.next_logprobs), ref[-1], atol=1e-3)
    assert math.isclose(sum(math.exp(x) for x in s.next_logprobs), 1.0, rel_tol=1e-4)


async def test_score_reads_prefix_cache_and_stays_exact(worker, hf, tok):
    """Prompt logprobs normally bypass the prefix cache; score() reads it when it can."""
    prefix = chat(tok, "71 + 16 - 9 + 35")
    cont = (await worker.generate(prefix, GenParams(max_tokens=60))).token_ids
    ref = hf_logprobs(hf, prefix + cont)
    # split late: the prefix now extends over cached blocks (prompt + generated tokens)
    cut = len(prefix) + len(cont) - 5
    s = await worker.score((prefix + cont)[:cut], (prefix + cont)[cut:])
    assert s.cached_prompt_tokens > 0
    expected = [ref[i - 1, (prefix + cont)[i]].item() for i in range(cut, len(prefix + cont))]
    assert max(abs(a - b) for a, b in zip(s.logprobs, expected)) < 1e-3
    # split early: the cache covers continuation rows too, so scoring reruns without it
    cut = len(prefix) + 1
    before = await worker.stats()
    s = await worker.score((prefix + cont)[:cut], (prefix + cont)[cut:])
    assert (await worker.stats()).requests == before.requests + 2
    expected = [ref[i - 1, (prefix + cont)[i]].item() for i in range(cut, len(prefix + cont))]
    assert max(abs(a - b) for a, b in zip(s.logprobs, expected)) < 1e-3


async def test_next_token_logprobs_matches_transformers(worker, hf, tok):
    ids = chat(tok, "53 + 51 - 6") + tok.encode("53 + 51 = ")
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    got = await worker.next_token_logprobs(ids, digits, top_k=3)
    ref = hf_logprobs(hf, ids)[-1]
    assert set(got.candidates) == set(digits)
    assert max(abs(got.candidates[d] - ref[d].item()) for d in digits) < 1e-3
    assert list(got.top) == ref.topk(3).indices.tolist()


async def test_generation_logprobs(worker, hf, tok):
    ids = chat(tok, "40 + 2")
    g = await worker.generate(ids, GenParams(max_tokens=10, logprobs=2))
    ref = hf_logprobs(hf, ids + g.token_ids)
    for i, lp in enumerate(g.logprobs):
        row = ref[len(ids) - 1 + i]
        assert lp.token_id == g.token_ids[i]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-3
        assert list(lp.top) == row.topk(2).indices.tolist()


async def test_extending_a_request_hits_the_prefix_cache(worker, tok):
    ids = chat(tok, "95 - 38 + 27 - 14")
    g1 = await worker.generate(ids, GenParams(max_tokens=80))
    before = await worker.stats()
    g2 = await worker.generate(ids + g1.token_ids[:-1] + tok.encode("\n\n"), GenParams(max_tokens=8))
    assert g2.cached_prompt_tokens > 0
    after = await worker.stats()
    assert after.cached_prompt_tokens - before.cached_prompt_tokens == g2.cached_prompt_tokens
    assert after.requests == before.requests + 1
    assert after.generated_tokens == before.generated_tokens + len(g2.token_ids)
    assert after.forward_passes > before.forward_passes and after.busy_s > before.busy_s


async def test_info(worker, tok):
    info = await worker.info()
    assert (info.backend, info.device, info.eos_token_id) == ("vllm", "cpu", tok.eos_token_id)
    assert info.vocab_size == len(tok) and info.context_length == 1024 and len(info.vocab_fingerprint) == 16


async def test_ngram_speculation_is_lossless(worker, tok):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    problems = ["53 + 51 - 6", "71 + 16 - 9 + 35", "95 - 38 + 27 - 14"]
    spec_worker = VLLMWorker.create(str(SMALL), max_model_len=1024, speculative=spec, engine_args=EAGER)
    try:
        for p in problems:
            plain = await worker.generate(chat(tok, p), GenParams(max_tokens=120))
            fast = await spec_worker.generate(chat(tok, p), GenParams(max_tokens=120))
            assert fast.token_ids == plain.token_ids
        stats = await spec_worker.stats()
        assert stats.spec_proposed_tokens > 0 and stats.spec_accepted_tokens > 0
        assert stats.forward_passes < stats.generated_tokens
    finally:
        await spec_worker.close()


@pytest.mark.slow
@pytest.mark.skipif(not (LARGE / "config.json").exists(), reason=f"arith large model not trained yet ({LARGE})")
async def test_draft_model_speculation_is_lossless(tok):
    """The arith small model drafts for the large one: the large model's greedy output is unchanged."""
    spec = {"method": "draft", "model": str(SMALL), "num_speculative_tokens": 3}
    plain = VLLMWorker.create(str(LARGE), max_model_len=1024, engine_args=EAGER)
    try:
        expected = [(await plain.generate(chat(tok, p), GenParams(max_tokens=120))).token_ids
                    for p in ("53 + 51 - 6", "71 + 16 - 9 + 35")]
    finally:
        await plain.close()
    drafted = VLLMWorker.create(str(LARGE), max_model_len=1024, speculative=spec, engine_args=EAGER)
    try:
        got = [(await drafted.generate(chat(tok, p), GenParams(max_tokens=120))).token_ids
               for p in ("53 + 51 - 6", "71 + 16 - 9 + 35")]
        stats = await drafted.stats()
    finally:
        await drafted.close()
    assert got == expected
    assert stats.spec_accepted_tokens > 0 and stats.forward_passes < stats.generated_tokens


async def test_missing_folders_fail_at_start_up(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLLMWorker.create(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="draft model folder"):
        VLLMWorker.create(str(SMALL), speculative={"method": "draft", "model": str(tmp_path / "nope"),
                                                   "num_speculative_tokens": 2})


async def test_bad_speculation_fails_at_start_up(tmp_path, tok):
    with pytest.raises(ValueError, match="unsupported speculative method"):
        VLLMWorker.create(str(SMALL), speculative={"method": "medusa", "num_speculative_tokens": 2})
    other = tmp_path / "other-vocab"
    other_tok = AutoTokenizer.from_pretrained(SMALL)
    other_tok.add_tokens(["<extra>"])
    other_tok.save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(other_tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match="different vocabulary"):
        VLLMWorker.create(str(SMALL), speculative={"method": "draft", "model": str(other), "num_speculative_tokens": 2})
