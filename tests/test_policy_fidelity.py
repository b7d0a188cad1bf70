"""Policies as their papers' reference code defines them (issue: six deviations).

Scripted workers whose outputs are known exactly (``tests/scripted.py``); the
same policies run on the real arith models in ``test_policies_real.py``.
"""

from __future__ import annotations

import collections
import math
import random
import zlib

import pytest

from policies import build_policy
from policies.baselines import LargeOnlyParams
from policies.consultant import ConsultantParams
from policies.spec_thinking import SpecThinkingParams
from policies.specreason import SpecReasonParams, read_score
from policies.speculative import SpeculativeParams
from tests.scripted import ChoiceWorker, ScriptedWorker, TableWorker, document, make_session

RECHECK = "1 + 1 = 2\n\n\\boxed{1}\n\nWait, recheck:\n\n1 + 1 = 2 so \\boxed{2}"


async def run(policy_params, small, large, **session_kw):
    s = make_session(small, large, **session_kw)
    pol = build_policy(policy_params)
    pol.check(s.models)
    await pol.run(s)
    return s.result(pol.name)


# ------------------------------------------------------------------ 1. stopping on an answer is the policy's choice


@pytest.mark.parametrize("params", [SpeculativeParams(draft_tokens=4), ConsultantParams(draft_tokens=4)])
async def test_token_level_policies_run_past_a_boxed_answer_like_large_only(params):
    alone = await run(LargeOnlyParams(), ChoiceWorker(document(RECHECK)), ChoiceWorker(document(RECHECK)))
    # the small model drafts a typo at some positions; the large model corrects it
    small = ChoiceWorker(document(RECHECK.replace("recheck", "rechek"), strict=False))
    r = await run(params, small, ChoiceWorker(document(RECHECK, strict=False)))
    assert alone.answer == "2" and alone.metrics.finish_reason == "eos"
    assert r.text == alone.text and r.answer == "2" and r.metrics.finish_reason == "eos"


async def test_spec_thinking_is_not_cut_at_the_first_answer():
    small = ChoiceWorker(document(RECHECK))
    large = ChoiceWorker(document(RECHECK))
    r = await run(SpecThinkingParams(n1=6, n2=4), small, large)
    assert r.text == RECHECK and r.answer == "2" and r.metrics.finish_reason == "eos"
    assert r.metrics.handoffs >= 1  # "wait, recheck" after the delimiter handed over


@pytest.mark.parametrize("marker", ["\\boxed{7}", "Answer: 7", "ANSWER: 7"])
async def test_specreason_stops_on_a_step_with_an_answer_marker(marker):
    doc = f"1 + 6 = 7\n\n{marker}\n\nWait, more steps\n\nand more"
    r = await run(SpecReasonParams(pipeline=False), ChoiceWorker(document(doc)), ChoiceWorker(document(doc)))
    assert r.text == f"1 + 6 = 7\n\n{marker}\n\n" and r.metrics.finish_reason == "answer"


# ------------------------------------------------------------------ 2. the pipelined draft respects the budget


def _random_pair(rng: random.Random):
    """A small and a large model writing random steps, and a judge whose score depends on the context only."""
    def doc(letter: str) -> str:
        return "".join(letter * rng.randint(1, 10) + "\n\n" for _ in range(40))
    small_doc, large_doc = doc("s"), doc("L")
    salt = rng.random()
    judge = lambda ctx: zlib.crc32(f"{salt}{ctx}".encode()) % 10  # noqa: E731
    return (lambda: ChoiceWorker(document(small_doc, strict=False)),
            lambda: ChoiceWorker(document(large_doc, strict=False), judge=judge))


async def test_specreason_pipeline_within_budget_example():
    steps = "abcdefg\n\n" * 6  # 7 letters + the delimiter token(s): 9 token ids per step with the stop string
    for pipeline in (False, True):
        r = await run(SpecReasonParams(pipeline=pipeline), ChoiceWorker(document(steps)),
                      ChoiceWorker(document(steps)), max_tokens=20)
        assert r.metrics.accepted_tokens["small"] == 20 and r.metrics.finish_reason == "budget"


async def test_specreason_pipeline_and_rewrite_ahead_on_equal_off_under_greedy():
    rng = random.Random(0)
    for _ in range(200):
        small, large = _random_pair(rng)
        budget = rng.randint(5, 120)
        threshold = rng.choice([3, 5, 7, 9])
        first_n = rng.choice([0, 0, 1])
        out = []
        for pipeline, rewrite in ((False, False), (True, False), (False, True), (True, True), (True, None)):
            r = await run(SpecReasonParams(pipeline=pipeline, rewrite_ahead=rewrite, threshold=threshold,
                                           first_n_large=first_n, max_step_tokens=8), small(), large(),
                          max_tokens=budget)
            out.append((r.text, [(g.author, g.accepted, g.tokens) for g in r.segments], r.metrics.finish_reason))
            assert sum(r.metrics.accepted_tokens.values()) <= budget
        assert all(o == out[0] for o in out[1:])


async def test_step_policies_write_the_same_text_across_vocabularies():
    """Models with different vocabularies exchange steps as text (re-encoded at the boundary), ids otherwise."""
    rng = random.Random(1)
    for _ in range(40):
        small, large = _random_pair(rng)
        budget = rng.randint(5, 120)
        for params in (SpecReasonParams(max_step_tokens=8), SpecThinkingParams(n1=3, n2=2, neg_threshold=2)):
            out = []
            for vocabs in (("chars", "chars"), ("chars", "other chars")):
                r = await run(params, small(), large(), max_tokens=budget, vocabs=vocabs)
                out.append((r.text, [(g.author, g.accepted, g.tokens) for g in r.segments]))
            assert out[0] == out[1]


# ------------------------------------------------------------------ 3. the greedy judge reads the argmax


def _decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def _top(table: dict[str, float]) -> dict[int, float]:
    return {ord(c): math.log(q) for c, q in sorted(table.items(), key=lambda kv: -kv[1])}


def test_greedy_score_is_the_argmax_token_if_it_is_a_digit():
    # top token "x" at 0.40, digits sum to 0.60: the reference scores 0 (not 9)
    assert read_score(_top({"x": 0.40, "9": 0.35, "8": 0.25}), _decode, "greedy") == 0.0
    # top token "9" at 0.30, digits hold only 0.35: the reference scores 9 (not 0)
    assert read_score(_top({"9": 0.30, "a": 0.25, "b": 0.2, "c": 0.2, "1": 0.05}), _decode, "greedy") == 9.0


def test_expected_score_renormalises_over_the_digits_in_the_top_k():
    assert read_score(_top({"x": 0.5, "9": 0.3, "6": 0.1}), _decode, "expected") == pytest.approx(8.25)
    assert read_score(_top({"x": 0.9, "y": 0.1}), _decode, "expected") == 0.0


async def test_specreason_judge_asks_for_the_top_10_and_reads_the_argmax():
    small = ScriptedWorker([("1 + 1 = 3", "stop"), ("\\boxed{2}", "eos")])
    large = ScriptedWorker([("1 + 1 = 2", "stop")],
                           judge_scores=[{"x": 0.40, "9": 0.35, "8": 0.25}, {"9": 0.30, "a": 0.25, "b": 0.25,
                                                                             "1": 0.05}])
    r = await run(SpecReasonParams(pipeline=False, threshold=7), small, large)
    assert [(g.author, g.accepted, g.score) for g in r.segments] == [
        ("small", False, 0.0), ("large", True, None), ("small", True, 9.0)]


# ------------------------------------------------------------------ 4. SpecReason's edge cases


async def test_specreason_strips_think_close_from_a_step_without_an_answer():
    doc = "a</think>b\n\nc\n\n"
    small = ChoiceWorker(lambda ctx: [("a</think>b\n\n", 1.0)] if not ctx else [("\\boxed{1}", 1.0)])
    r = await run(SpecReasonParams(pipeline=False), small, ChoiceWorker(document(doc)))
    assert r.text == "ab\n\n\\boxed{1}" and r.metrics.finish_reason == "eos"


async def test_specreason_keeps_think_close_in_a_step_with_an_answer():
    small = ChoiceWorker(lambda ctx: [("</think>\\boxed{1}\n\nmore", 1.0)])
    r = await run(SpecReasonParams(pipeline=False), small, ChoiceWorker(document("")))
    assert r.text == "</think>\\boxed{1}\n\n" and r.metrics.finish_reason == "answer"


@pytest.mark.parametrize("pipeline", [False, True])
async def test_specreason_joins_a_step_cut_at_max_step_tokens_with_the_delimiter(pipeline):
    small = ChoiceWorker(lambda ctx: [("abcdefghij\n\n", 1.0)] if not ctx else [("ok", 1.0)])
    r = await run(SpecReasonParams(pipeline=pipeline, max_step_tokens=4), small, ChoiceWorker(document("")))
    assert r.text == "abcd\n\nok" and r.metrics.finish_reason == "eos"


# ------------------------------------------------------------------ 5. Speculative Thinking's statement probes


def _so_or_wait(ctx: str) -> list[tuple[str, float]]:
    if not ctx:
        return [("Start.\n\n", 1.0)]
    if ctx == "Start.\n\n":
        return [("So x is 1.\n\n", 0.5), ("Wait, no.\n\n", 0.5)]
    return [("\\boxed{1}", 1.0)]


async def test_spec_thinking_statement_probes_resample_in_distribution():
    """After the first delimiter: the reference gives large 1/2, small "So" 1/4, small "Wait" 1/4."""
    large = ChoiceWorker(lambda ctx: [("Large.\n\n\\boxed{1}", 1.0)])
    n, counts = 3000, collections.Counter()
    for seed in range(n):
        r = await run(SpecThinkingParams(n1=4, n2=0), ChoiceWorker(_so_or_wait), large, temperature=0.6, seed=seed)
        after = [g for g in r.segments if g.accepted][1]
        counts["large" if after.author == "large" else after.text.split()[0].strip(",")] += 1
    expected = {"large": 0.5, "So": 0.25, "Wait": 0.25}
    assert set(counts) == set(expected), counts
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    assert chi2 < 13.8, counts  # chi-square, 2 dof, p = 0.001


async def test_spec_thinking_checks_the_trigger_at_a_delimiter_inside_a_statement_probe():
    doc = "A\n\nB is 2.\n\nWait, check.\n\n\\boxed{2}"
    small, large = ChoiceWorker(document(doc)), ChoiceWorker(document(doc))
    # n1 = 10: the probe after "A\n\n" is "B is 2.\n\nW", a statement that crosses the next delimiter
    r = await run(SpecThinkingParams(n1=10, n2=0), small, large)
    assert r.text == doc and r.metrics.handoffs == 1
    burst = [g for g in r.segments if g.author == "large"][0]
    assert burst.text.startswith("Wait")


# ------------------------------------------------------------------ 6. Consultant Decoding's bonus token


async def test_consultant_emits_the_bonus_token_when_every_draft_is_kept():
    doc = "abcdefghij" * 4  # 40 tokens, then EOS
    r = await run(ConsultantParams(draft_tokens=4), ChoiceWorker(document(doc)), ChoiceWorker(document(doc)),
                  max_tokens=100)
    assert r.text == doc
    # 4 kept drafts + the bonus token per large call: 41 tokens (EOS included) in 9 calls (10 + 1 without the bonus)
    assert r.metrics.calls["large"] == 9 and r.metrics.accepted == 33


async def test_consultant_samples_its_replacement_from_the_scoring_pass():
    small = TableWorker([[0, 5, 0, -9]])  # always drafts token 1
    large = TableWorker([[0, 1.0, 1.2, -9]] * 8 + [[0, 0, 0, 9]])  # token 1 at p ~ 0.4: some misses at epsilon 0.5
    r = await run(ConsultantParams(draft_tokens=4, epsilon=0.5, pipeline=False), small, large, max_tokens=8,
                  temperature=1.0, seed=3, prompt=[0])
    assert r.metrics.proposed > r.metrics.accepted  # there were misses...
    assert r.metrics.calls["large"] == r.metrics.calls["small"]  # ...and each round (one draft) is one large call
    assert len([c for c in large.calls if c[0] == "score"]) == r.metrics.calls["small"]


async def test_spec_thinking_greedy_takes_the_resample_from_a_statement_probe():
    """Greedy resampling would rewrite the probe up to its delimiter: same text, no second small pass."""
    doc = "A is 1.\n\nB is 2.\n\nC is 3.\n\nD is 4.\n\n\\boxed{4}"
    small, large = ChoiceWorker(document(doc)), ChoiceWorker(document(doc))
    r = await run(SpecThinkingParams(n1=12), small, large)
    assert r.text == doc and r.metrics.handoffs == 0
    probes = [g for g in r.segments if g.kind == "probe"]
    assert len(probes) == 4 and all(g.note == "statement: resampled" for g in probes)
    # one generate for "A is 1.", one per probe, one for the last segment: no regeneration of a probe's text
    assert len([c for c in small.calls if c[0] == "generate"]) == 1 + 4 + 1
