"""Every policy rule, on scripted workers (the same policies run on the real arith pair elsewhere)."""

from __future__ import annotations

import collections

import pytest
import torch

from policies import SpecReason, build_policy
from policies.consultant import ConsultantParams
from policies.spec_thinking import SpecThinkingParams, classify
from policies.specreason import SpecReasonParams
from policies.speculative import SpeculativeParams, accept_reject
from workers.protocol import GenParams
from tests.scripted import EOS, ScriptedWorker, TableWorker, make_session  # noqa: F401


def specreason(**kw) -> SpecReason:
    """Scripted workers answer in call order, so rule tests run unpipelined (pipelining has its own test)."""
    return build_policy(SpecReasonParams(**{"pipeline": False, **kw}))


async def test_specreason_accepts_and_rejects_by_threshold():
    small = ScriptedWorker([("1 + 1 = 3", "stop"), ("2 + 2 = 4", "stop"), ("\\boxed{4}", "eos")])
    large = ScriptedWorker([("1 + 1 = 2", "stop")], judge_scores=[2, 9, 8])
    s = make_session(small, large)
    pol = specreason(threshold=7)
    pol.check(s.models)
    await pol.run(s)
    r = s.result(pol.name)
    assert [(g.author, g.accepted, g.score) for g in r.segments] == [
        ("small", False, 2.0), ("large", True, None), ("small", True, 9.0), ("small", True, 8.0)]
    assert r.text == "1 + 1 = 2\n\n2 + 2 = 4\n\n\\boxed{4}"
    assert r.answer == "4" and r.metrics.proposed == 3 and r.metrics.accepted == 2 and r.metrics.handoffs == 1


async def test_specreason_judge_reads_digits_after_context():
    small = ScriptedWorker([("a", "stop"), ("\\boxed{1}", "eos")])
    large = ScriptedWorker(judge_scores=[9, 9])
    s = make_session(small, large)
    pol = specreason()
    pol.check(s.models)
    await pol.run(s)
    # the judge prompt extends exactly the context the large model would continue from
    judge_len = large.calls[0][1][0]
    assert judge_len == len(s.prompt_ids["large"]) + len("a\n\n") + len(pol._suffix(s.models["large"]))


async def test_specreason_first_n_steps_by_large_and_budget():
    small = ScriptedWorker([(f"s{i}", "stop") for i in range(2, 10)])
    large = ScriptedWorker([("L1", "stop")], judge_scores=[9] * 10)
    s = make_session(small, large, max_tokens=8)
    pol = specreason(first_n_large=1)
    pol.check(s.models)
    await pol.run(s)
    assert s.segments[0].author == "large" and s.segments[0].score is None
    assert s.result(pol.name).metrics.finish_reason == "budget"
    assert len(small.calls) == 3  # L1, s2, s3, s4: 2 tokens each reach the budget of 8


async def test_specreason_pipeline_drafts_next_step_while_judging():
    small = ScriptedWorker([("a", "stop"), ("b", "stop"), ("c", "stop"), ("\\boxed{1}", "eos")])
    large = ScriptedWorker([("B", "stop")], judge_scores=[9, 2, 9])
    s = make_session(small, large)
    pol = specreason(pipeline=True)
    pol.check(s.models)
    await pol.run(s)
    # "b" was drafted during the judging of "a"; "c" during "b"'s judging, then discarded when "b" was rejected
    assert s.reasoning == "a\n\nB\n\n\\boxed{1}"
    prompt = len(s.prompt_ids["small"])
    assert [c[1][0] for c in small.calls] == [prompt, prompt + 3, prompt + 6, prompt + 6]


async def test_specreason_stops_on_repeated_step():
    small = ScriptedWorker([("same", "stop")] * 5)
    large = ScriptedWorker(judge_scores=[9] * 5)
    s = make_session(small, large)
    pol = specreason()
    pol.check(s.models)
    await pol.run(s)
    # the reference checks for a repeat from the third step on
    assert s.metrics.finish_reason == "repeat" and len(s.segments) == 3


def test_cue_classification_follows_reference():
    p = SpecThinkingParams()
    assert classify("Wait, let me recompute", p) == "reflection"
    assert classify("Yes, that is the final answer", p) == "affirmation"
    assert classify("yes but wait", p) == "reflection"  # a tie goes to reflection
    assert classify("Let me check this", p) == "reflection"  # verification cues count as reflection
    assert classify("12 + 5 = 17", p) == "statement"


async def test_spec_thinking_handoffs():
    small = ScriptedWorker([("step one", "stop"), ("Wait, redo", "length"), ("step two", "stop"),
                            ("more", "length"), ("\\boxed{2}", "eos")])
    large = ScriptedWorker([("Let me check: 2", "length"), (" verified ok", "length")])
    s = make_session(small, large)
    pol = build_policy(SpecThinkingParams(n1=5, n2=7))
    await pol.run(s)
    kinds = [(g.author, g.kind, g.accepted, g.note) for g in s.segments]
    assert kinds == [
        ("small", "step", True, None),
        ("small", "probe", False, "reflection"),      # the reflection probe is dropped
        ("large", "burst", True, "reflection"),       # the large model writes n1 tokens instead
        ("large", "burst", True, "verification"),     # its verification cue earns an n2 burst
        ("small", "step", True, None),
        ("small", "probe", False, "statement: resampled"),  # a statement probe is discarded...
        ("small", "step", True, None),                     # ...and the small model writes afresh
    ]
    assert [c[1][1] for c in large.calls] == [5, 7]


async def test_spec_thinking_excessive_reflection_review():
    small = ScriptedWorker([("a", "stop"), ("wait", "length"), ("b", "stop"), ("\\boxed{1}", "eos")])
    large = ScriptedWorker([("hold on", "length"), ("reviewed", "length")])
    s = make_session(small, large)
    pol = build_policy(SpecThinkingParams(n1=4, n3=9, neg_threshold=1))
    await pol.run(s)
    review = [g for g in s.segments if g.kind == "review"]
    assert review[0].text == pol.params.review_prompt and review[1].text == "reviewed"
    assert large.calls[-1][1][1] == 9


def table(rows):
    return TableWorker(rows)


async def test_consultant_keeps_tokens_under_epsilon_and_uses_large_token_at_miss():
    # small always drafts token 1; large puts 0.6 on token 1 at positions 1-2 (row 0 is the prompt),
    # then prefers token 2 strongly
    small = table([[0, 5, 0, -9]])
    large = table([[0, 3, 2.5, -9]] * 3 + [[0, -5, 5, -9]] + [[0, 0, 0, 9]])
    s = make_session(small, large, max_tokens=6, prompt=[0])
    pol = build_policy(ConsultantParams(draft_tokens=4, epsilon=2.0))
    pol.check(s.models)
    await pol.run(s)
    authors = [(g.author, g.tokens) for g in s.segments]
    assert authors[:2] == [("small", 2), ("large", 1)]  # two drafts kept, the 3rd missed -> large's argmax
    assert s.reasoning[:3] == "\x01\x01\x02"


async def test_consultant_ema_smoothing_delays_a_single_miss():
    small = table([[0, 5, 0, -9]])
    # one unlikely token (nll ~ 3.0) after likely ones: plain rule rejects it, EMA with beta=0.8 keeps it
    rows = [[0, 6, 0, -9]] * 3 + [[2, -1, 2, -9]] + [[0, 6, 0, -9]] * 4
    for beta, expect in ((0.0, 3), (0.8, 4)):
        s = make_session(small, table(rows), max_tokens=4, prompt=[0])
        pol = build_policy(ConsultantParams(draft_tokens=4, epsilon=2.0, beta=beta))
        await pol.run(s)
        assert s.metrics.accepted == expect


async def test_token_level_policies_need_a_shared_vocabulary():
    s = make_session(table([[0, 1, 0, 0]]), table([[0, 1, 0, 0]]))
    s.models["small"].vocab_fingerprint = "other"
    with pytest.raises(ValueError, match="shared vocabulary"):
        build_policy(ConsultantParams()).check(s.models)


async def test_speculative_greedy_equals_large_model():
    small = table([[0, 5, 0, -9], [5, 0, 0, -9], [0, 0, 5, -9]])
    large = table([[0, 5, 0, -9], [0, 0, 5, -9], [0, 0, 5, -9], [0, 0, 0, 9]])
    s = make_session(small, large, max_tokens=10, prompt=[0])
    await build_policy(SpeculativeParams(draft_tokens=3)).run(s)
    alone = await large.generate([0], GenParams(max_tokens=10))
    assert s.reasoning == "".join(chr(t) for t in alone.token_ids if t != EOS)  # char tokenizer: id -> chr(id)
    assert s.metrics.finish_reason == "eos" and s.metrics.proposed > 0


def test_accept_reject_is_lossless_in_distribution():
    """Draft from q, accept/reject against p: the first emitted token must be distributed as p."""
    p = torch.tensor([[0.1, 0.6, 0.3]])
    q = torch.tensor([[0.5, 0.2, 0.3]])
    rng = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=rng))
        k, nxt = accept_reject(p, q, [x], None, rng)
        counts[x if k == 1 else nxt] += 1
    emp = torch.tensor([counts[i] / n for i in range(3)])
    chi2 = float((((emp - p[0]) ** 2) / p[0]).sum() * n)
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


async def test_speculative_sampling_matches_large_distribution_over_sequences():
    """Two-token outputs under sampling: SD's empirical distribution fits the large model's exactly."""
    small_rows = [[0, 1.0, 0.5, -1], [0.3, 0, 1.0, 0], [0, 0, 0, 9]]
    large_rows = [[0, 0.2, 1.5, -1], [1.0, 0.5, 0, 0.5], [0, 0, 0, 9]]
    small, large = table(small_rows), table(large_rows)
    p = [torch.softmax(torch.tensor(r, dtype=torch.float32), -1) for r in large_rows]
    exact = collections.Counter()
    for a in range(4):
        if a == EOS:
            exact[""] += float(p[0][a])
            continue
        for b in range(4):
            exact[chr(a) + ("" if b == EOS else chr(b))] += float(p[0][a] * p[1][b])
    n, counts = 4000, collections.Counter()
    for seed in range(n):
        s = make_session(small, large, max_tokens=2, temperature=1.0, seed=seed, prompt=[])
        await build_policy(SpeculativeParams(draft_tokens=2)).run(s)
        counts[s.reasoning[:2]] += 1
    assert set(counts) <= set(exact)
    chi2 = sum((counts[k] - n * v) ** 2 / (n * v) for k, v in exact.items())
    assert chi2 < 37.7, (chi2, counts)  # chi-square, 16 outcomes - 1 dof, p = 0.001
