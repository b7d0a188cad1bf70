"""BiLD, EASD, Speculative Verification and Reflective Verification (issue 16, part 1).

Unit tests pin each rule on ``TableWorker`` pairs (``tests/scripted.py``: fixed
logits per position, so every probability is known): BiLD's fallback and rollback
points, EASD's entropy gate, SV's verification length, RV's layout and fused
distribution; each lossy rule is shown to part from lossless SD where it should, and
SV (length only) to keep the large model's distribution. The real-model tests run
each policy end to end on the arith pair (hf; vLLM under the ``vllm`` mark) and check
the rule's limits against LargeOnly token for token under greedy decoding.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from orchestrator import Orchestrator, load_config
from orchestrator.session import ModelHandle, Session
from policies import build_policy
from policies.bild import BiLDParams, fallback_point, rollback_point
from policies.easd import EASDParams, gate, without
from policies.reflective import ReflectiveParams, layout
from policies.spec_verification import SpecVerificationParams, overlap_mass, verification_length
from policies.speculative import Reread, SpeculativeParams
from tests.scripted import EOS, CharTokenizer, TableWorker, make_session
from workers.protocol import Fusion, GenParams
from workers.sampling import fuse

CONFIDENT_1 = [0, 5, 0, -9]  # p(1) = 0.987
UNSURE = [0, 0.5, 0.4, -9]  # top-1 p = 0.38


async def run(params, small, large, **kw):
    s = make_session(small, large, prompt=kw.pop("prompt", [0]), **kw)
    pol = build_policy(params)
    pol.check(s.models)
    await pol.run(s)
    return s


def text(s: Session) -> str:
    return s.reasoning


def chi2(counts: collections.Counter, exact: dict, n: int) -> float:
    assert set(counts) <= {k for k, v in exact.items() if v > 0}, counts
    return sum((counts[k] - n * v) ** 2 / (n * v) for k, v in exact.items() if v > 0)


# ------------------------------------------------------------------ BiLD


def test_bild_points():
    assert fallback_point([0.9, 0.7, 0.59, 0.9], 0.6) == 2 and fallback_point([0.9, 0.9], 0.6) == 2
    assert rollback_point([0.1, 6.0, 7.0], [1, 2, 2], [1, 1, 1], 5.0) == 1
    assert rollback_point([0.1, 6.0], [1, 1], [1, 1], 5.0) is None  # the large argmax is the small token: no rollback
    assert rollback_point([4.9, 5.0], [2, 2], [1, 1], 5.0) is None  # strictly above the threshold


async def test_bild_falls_back_where_the_small_model_is_unsure():
    # positions 1-2 confident, position 3 unsure: two small tokens, then the large model writes position 3
    small = TableWorker([CONFIDENT_1, CONFIDENT_1, CONFIDENT_1, UNSURE, CONFIDENT_1])
    large = TableWorker([[0, 3, 0, -9]] * 3 + [[0, 0, 4, -9]] + [[0, 0, 0, 9]])
    s = await run(BiLDParams(large_first=False), small, large, max_tokens=3)
    segs = [(g.author, g.tokens, g.accepted) for g in s.segments]
    assert segs[:3] == [("small", 1, False), ("small", 2, True), ("large", 1, True)]
    assert "fallback: small top-1 p 0.398 < 0.6" in s.segments[0].note
    assert large.calls[0] == ("score", (1, 2))  # the large pass covers the two small tokens only
    assert text(s)[:3] == "\x01\x01\x02"
    assert s.metrics.proposed == 2 and s.metrics.handoffs == 0  # a fallback is no rollback


async def test_bild_rolls_back_only_past_the_threshold_and_differs_from_sd():
    small = TableWorker([CONFIDENT_1])
    # the large model prefers token 2 at position 3: nll(1) ~ 3.1 there (kept under 5.0), ~12 with sharper logits
    for row, rolled in (([0, 0, 3, -9], False), ([0, -6, 6, -9], True)):
        large = TableWorker([[0, 3, 0, -9]] * 3 + [row] + [[0, 3, 0, -9]] * 8)
        s = await run(BiLDParams(large_first=False, draft_tokens=4), small, large, max_tokens=4)
        sd = await run(SpeculativeParams(draft_tokens=4), small, large, max_tokens=4)
        assert text(sd) == "\x01\x01\x02\x01"  # lossless greedy SD follows the large argmax
        if rolled:
            assert text(s) == text(sd) and s.metrics.handoffs == 1
            rejected = [g for g in s.segments if not g.accepted]
            assert rejected[0].tokens == 2 and rejected[0].note.startswith("rollback: large nll 12.")
        else:
            assert text(s) == "\x01\x01\x01\x01" != text(sd)  # BiLD keeps a plausible small token; SD does not
            assert s.metrics.accepted == 4 and s.metrics.handoffs == 0


async def test_bild_does_not_roll_back_the_large_argmax():
    small = TableWorker([CONFIDENT_1])
    large = TableWorker([[0, 0.01, 0, 0]])  # flat: nll(1) = 1.38 > 1.0, but 1 is the large argmax
    s = await run(BiLDParams(large_first=False, draft_tokens=3, rollback_threshold=1.0), small, large, max_tokens=3)
    assert s.metrics.accepted == 3 and s.metrics.handoffs == 0


async def test_bild_starts_with_the_large_model_and_caps_small_runs():
    small = TableWorker([CONFIDENT_1])
    large = TableWorker([[0, 0, 0, 0], [0, 0, 3, -9]] + [[0, 3, 0, -9]] * 30)
    s = await run(BiLDParams(draft_tokens=3), small, large, max_tokens=9)
    assert [(g.author, g.tokens) for g in s.segments] == [("large", 1), ("small", 3), ("large", 1),
                                                          ("small", 3), ("large", 1)]
    assert large.calls[0] == ("score", (1, 0)) and text(s)[0] == "\x02"


async def test_bild_with_rollback_threshold_zero_is_greedy_sd():
    small = TableWorker([[0, 5, 0, -9], [5, 0, 0, -9], [0, 0, 5, -9]])
    large = TableWorker([[0, 5, 0, -9], [0, 0, 5, -9], [0, 0, 5, -9], [0, 0, 0, 9]])
    s = await run(BiLDParams(rollback_threshold=0.0, fallback_threshold=0.0), small, large, max_tokens=10)
    alone = await large.generate([0], GenParams(max_tokens=10))
    assert text(s) == "".join(chr(t) for t in alone.token_ids if t != EOS) and s.metrics.finish_reason == "eos"


# ------------------------------------------------------------------ EASD

FLAT = [0.1, 0.3, 0.2, 0.0]  # entropy 1.38 nats, top-2 {1, 2}


def test_easd_gate_reads_both_entropies_and_the_overlap():
    p = EASDParams(entropy_threshold=1.0, top_n=2, overlap_threshold=0.5)
    assert gate(p, 1.2, 1.3, [1, 2], [2, 1]) is not None
    assert gate(p, 0.9, 1.3, [1, 2], [2, 1]) is None and gate(p, 1.2, 0.9, [1, 2], [1, 2]) is None
    assert gate(p, 1.2, 1.3, [1, 2], [0, 3]) is None
    low = p.model_copy(update={"overlap": "low"})
    assert gate(low, 1.2, 1.3, [1, 2], [0, 3]) is not None and gate(low, 1.2, 1.3, [1, 2], [2, 1]) is None
    assert without(torch.tensor([0.5, 0.25, 0.25]), 0).tolist() == [0, 0.5, 0.5]


async def test_easd_rejects_an_uncertain_agreed_token_where_sd_keeps_it():
    small, large = TableWorker([FLAT]), TableWorker([FLAT])  # both pick token 1, both uncertain, top-2 agree
    params = EASDParams(draft_tokens=3, entropy_threshold=1.0, top_n=2, overlap_threshold=0.5)
    s = await run(params, small, large, max_tokens=3)
    sd = await run(SpeculativeParams(draft_tokens=3), small, large, max_tokens=3)
    assert text(sd) == "\x01\x01\x01"
    assert text(s) == "\x02\x02\x02"  # each round: the draft's token rejected, the large model's next best instead
    assert s.metrics.accepted == 0 and s.metrics.handoffs == 3
    assert s.segments[0].note.startswith("entropy gate: H small 1.3") and not s.segments[0].accepted
    for off in (dict(entropy_threshold=2.0), dict(overlap="low")):  # gate closed: plain SD
        s = await run(params.model_copy(update=off), small, large, max_tokens=3)
        assert text(s) == text(sd)


async def test_easd_sampling_resamples_without_the_draft_token():
    """Gate open at the first position whatever is drafted: the token is drawn from p without the draft's, and
    no vocabulary-sized row crosses the protocol."""
    q_row, p_row = [0.0, 3.0, 0.0, -1.0], [0.3, 0.1, 0.0, -0.3]  # entropies 0.44 and 1.37 nats
    small, large = TableWorker([q_row]), TableWorker([p_row])
    q, p = torch.softmax(torch.tensor(q_row), -1), torch.softmax(torch.tensor(p_row), -1)
    exact = collections.Counter()
    for x in range(4):
        for v in range(4):
            if v != x:
                exact["" if v == EOS else chr(v)] += float(q[x] * p[v] / (1 - p[x]))
    params = EASDParams(draft_tokens=1, entropy_threshold=0.3, top_n=2, overlap_threshold=0.0)
    n, counts = 1500, collections.Counter()
    for seed in range(n):
        s = await run(params, small, large, max_tokens=1, temperature=1.0, seed=seed, prompt=[])
        counts[text(s)] += 1
    assert chi2(counts, exact, n) < 16.3  # chi-square, 3 dof, p = 0.001
    assert counts["\x01"] / n < float(p[1]) - 0.15  # far from the large model's own distribution (0.04 vs 0.26)
    assert small.rows_sent == large.rows_sent == 0  # entropies, top-N and the draws are read in the workers


async def test_easd_sampling_reads_the_row_once_when_every_draw_is_the_draft_token():
    """Gate forced open where p is nearly all on the drafted token: its 16 draws are all that token, so the
    re-sample reads p's row once and draws from the rest, evenly here."""
    sure = [-9.0, 9.0, -9.0, -9.0]
    small, large = TableWorker([sure]), TableWorker([sure])
    params = EASDParams(draft_tokens=1, entropy_threshold=0.0, top_n=2, overlap_threshold=0.0)
    counts = collections.Counter()
    for seed in range(300):
        s = await run(params, small, large, max_tokens=1, temperature=1.0, seed=seed, prompt=[])
        counts[text(s)] += 1
    assert large.rows_sent == 300 and small.rows_sent == 0
    assert set(counts) == {"", "\x00", "\x02"} and min(counts.values()) > 60, counts


# ------------------------------------------------------------------ Speculative Verification


def test_sv_verification_length_maximises_goodput():
    a = [0.9, 0.9, 0.1, 0.9]
    assert verification_length(a, 0.1) == 2  # goodput 1.73, 2.26, 2.15: the search stops at 2
    assert verification_length(a, 0.0) == 4 and verification_length(a, 10.0) == 1
    assert verification_length([], 0.1) == 0
    assert overlap_mass({1: 0.5, 2: 0.3}, {1: 0.2, 2: 0.6, 3: 0.1}) == pytest.approx(0.5)


async def test_sv_verifies_the_predicted_prefix_and_keeps_large_output():
    # draft probabilities 0.987, 0.987, 0.398, 0.987: gamma = 2 at cost 0.3 (goodput 1.53, 1.85, 1.76, 1.70)
    small = TableWorker([CONFIDENT_1, CONFIDENT_1, CONFIDENT_1, UNSURE] + [CONFIDENT_1] * 20)
    large = TableWorker([[0, 3, 0, -9]] * 6 + [[0, 0, 0, 9]])
    s = await run(SpecVerificationParams(draft_tokens=4, verify_cost=0.3), small, large, max_tokens=12)
    assert large.calls[0] == ("score", (1, 2))
    assert s.segments[0].note.startswith("unverified: gamma 2 of 4") and not s.segments[0].accepted
    alone = await large.generate([0], GenParams(max_tokens=12))
    assert text(s) == "".join(chr(t) for t in alone.token_ids if t != EOS)
    full = await run(SpecVerificationParams(draft_tokens=4, verify_cost=0.0), small, TableWorker(large.logits.tolist()),
                     max_tokens=12)
    assert text(full) == text(s) and s.metrics.proposed < full.metrics.proposed


async def test_sv_companion_signals():
    small = TableWorker([CONFIDENT_1])
    twin, other = TableWorker([CONFIDENT_1]), TableWorker([[0, -2, 3, -9]])  # agrees / disagrees with the draft
    tok = CharTokenizer()
    for companion, gamma in ((twin, 4), (other, 1)):
        large = TableWorker([[0, 3, 0, -9]])
        models = {r: ModelHandle(r, w, tok, EOS, "chars") for r, w in (("small", small), ("mid", companion),
                                                                        ("large", large))}
        s = Session(problem="p", models=models, prompt_ids={r: [0] for r in models},
                    params=GenParams(max_tokens=4), max_tokens=4)
        pol = build_policy(SpecVerificationParams(draft_tokens=4, companion="mid", verify_cost=0.1))
        assert pol.roles == ("small", "mid", "large")
        pol.check(s.models)
        await pol.run(s)
        assert large.calls[0] == ("score", (1, gamma)) and text(s)[:1] == "\x01"


async def test_sv_sampling_keeps_the_large_distribution():
    """Two-token outputs under sampling fit the large model's distribution, with gamma depending on the first draw."""
    # Markov tables (row 0: start, row 1 + t: after token t). The draft's top-1 after a 1 is 0.25 (gamma 1),
    # after a 0 or a 2 it is 0.89 or 0.71 (gamma 2): a1 a2 (1 + c) > c (1 + a1) with a1 = 0.474, c = 0.1
    small_rows = [[0, 1.0, 0.5, -1], [3, 0, 0, -1], [0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 9]]
    large_rows = [[0, 0.2, 1.5, -1], [1.0, 0.5, 0, 0.5], [0, 1, 0, 0], [0.5, 0, 1, 0], [0, 0, 0, 9]]
    small, large = TableWorker(small_rows, markov=True), TableWorker(large_rows, markov=True)
    p = torch.softmax(torch.tensor(large_rows), -1)
    exact = {"": float(p[0][EOS])}
    for a in range(3):
        for b in range(4):
            exact[chr(a) + ("" if b == EOS else chr(b))] = float(p[0][a] * p[1 + a][b])
    n, counts, gammas = 2000, collections.Counter(), collections.Counter()
    for seed in range(n):
        large.calls.clear()
        s = await run(SpecVerificationParams(draft_tokens=2, verify_cost=0.1), small, large, max_tokens=2,
                      temperature=1.0, seed=seed, prompt=[])
        counts[text(s)[:2]] += 1
        gammas[large.calls[0][1][1]] += 1
    assert gammas[1] > 300 and gammas[2] > 300, gammas
    assert chi2(counts, exact, n) < 32.9  # chi-square, 13 outcomes (12 dof), p = 0.001


# ------------------------------------------------------------------ Reflective Verification


def test_rv_fusion_and_layout():
    lp = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    lr = torch.log(torch.tensor([0.1, 0.2, 0.7]))
    assert fuse(lp, lr, 0.25, "linear").exp().tolist() == pytest.approx([0.475, 0.275, 0.25])
    geo = torch.tensor([0.6 ** 0.5 * 0.1 ** 0.5, 0.3 ** 0.5 * 0.2 ** 0.5, 0.1 ** 0.5 * 0.7 ** 0.5])
    assert fuse(lp, lr, 0.5, "log-linear").exp().tolist() == pytest.approx((geo / geo.sum()).tolist())
    assert fuse(lp, lr, 0.0, "linear") is lp
    assert layout([7, 8, 9], [1, 2], [5], 2) == [1, 2, 5, 8, 9, 1, 2] and layout([7], [1], [], 0) == [1, 1]


# prompt [0], one draft token, probe "\x02", position prefix [0]: scored continuation [d, 2, 0, d];
# row 1 is the plain distribution of d, row 4 the reflective one
RV_LARGE = [[0, 0, 0, 0], [0, 2, 1.5, -9], [0, 0, 0, 0], [0, 0, 0, 0], [0, -1, 3, -9], [0, 0, 0, 0]]
RV = dict(draft_tokens=1, probe_text="\x02", position_tokens=1)


async def test_rv_rejects_on_the_fused_distribution_where_sd_accepts():
    small = TableWorker([[0, 0, 0, 0], CONFIDENT_1])
    s = await run(ReflectiveParams(alpha=0.5, **RV), small, TableWorker(RV_LARGE), max_tokens=1)
    large = TableWorker(RV_LARGE)
    s0 = await run(ReflectiveParams(alpha=0.0, **RV), small, large, max_tokens=1)
    sd = await run(SpeculativeParams(draft_tokens=1), small, TableWorker(RV_LARGE), max_tokens=1)
    assert large.calls[0] == ("score", (1, 4))  # [d, probe, position prefix, d]
    assert text(sd) == text(s0) == "\x01"  # plain argmax 1 (0.57); alpha 0 is SD
    assert text(s) == "\x02" and not s.segments[0].accepted  # fused: 0.5*0.35 + 0.5*0.94 on token 2 beats 0.30
    assert large.rows_sent == small.rows_sent == 0  # the fused argmax is read in the large model's worker


async def test_rv_sampling_follows_the_fused_distribution():
    small_row = [0.2, 0.5, 0.1, -1.0]
    small = TableWorker([[0, 0, 0, 0], small_row])
    large = TableWorker(RV_LARGE)
    rows = torch.log_softmax(torch.tensor(RV_LARGE, dtype=torch.float32), -1)
    f = fuse(rows[1], rows[4], 0.5, "linear").exp()
    exact = {("" if v == EOS else chr(v)): float(f[v]) for v in range(4)}
    n, counts = 1500, collections.Counter()
    for seed in range(n):
        s = await run(ReflectiveParams(alpha=0.5, **RV), small, large, max_tokens=1, temperature=1.0, seed=seed)
        counts[text(s)] += 1
    assert chi2(counts, exact, n) < 16.3  # chi-square, 3 dof, p = 0.001
    assert counts["\x02"] / n > math.exp(rows[1][2]) + 0.1  # far from the plain distribution
    assert large.rows_sent == small.rows_sent == 0  # fused p and its draws read in the worker, q with the draft


async def test_rv_residual_rereads_the_fused_row():
    """When the residual needs more draws of p, they come from the same fused pass and row, not a plain call."""
    large = TableWorker(RV_LARGE)
    s = make_session(TableWorker([[0, 0, 0, 0]]), large, prompt=[0], temperature=1.0)
    fusion = Fusion(offset=3, alpha=0.5)
    again = Reread("large", [0], [1, 2, 0, 1], 0, fusion)
    rows = torch.log_softmax(torch.tensor(RV_LARGE, dtype=torch.float32), -1)
    f = fuse(rows[1], rows[4], 0.5, "linear")
    draws, lps = await again.draws(s, 4000)
    assert lps == pytest.approx([float(f[t]) for t in draws], abs=1e-5)
    assert collections.Counter(draws)[2] / 4000 == pytest.approx(float(f[2].exp()), abs=0.03)
    assert await again.logprobs(s) == pytest.approx(f.tolist(), abs=1e-5)


# ------------------------------------------------------------------ real models: the arith pair

PROBLEMS = ["53 + 51 - 6 + 20", "30 - 25 + 37 + 5 - 25"]
SHORT = ["sampling.max_tokens=48"]


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def pair(request, engines):
    return {"small": engines(request.param, "small"), "large": engines(request.param, "large")}


async def solve(pair, config: str, overrides=()):
    orch = Orchestrator(load_config(config, [*SHORT, *overrides]), workers=pair)
    try:
        return await orch.asolve_batch(PROBLEMS, concurrency=len(PROBLEMS))
    finally:
        await orch.aclose()


@pytest.fixture(scope="module")
async def large_only(pair):
    return [r.text for r in await solve(pair, "arith-v1/large-only")]


@pytest.mark.parametrize("config, exact", [
    ("bild", ["policy.rollback_threshold=0"]),  # every disagreement rolls back: greedy SD
    ("easd", ["policy.entropy_threshold=1e9"]),  # the gate never opens: SD
    ("spec-verification", []),  # lossless at any verification length
    ("reflective", ["policy.alpha=0"]),  # plain distributions: SD
])
async def test_policy_runs_records_and_meets_its_limit(pair, large_only, config, exact):
    results = await solve(pair, f"arith-v1/{config}")
    for r in results:
        m = r.metrics
        assert r.text == "".join(s.text for s in r.segments if s.accepted)
        assert m.proposed > 0 and 0 <= m.accepted <= m.proposed and m.accepted_tokens.get("large", 0) > 0
        assert m.tokens["small"] >= m.accepted_tokens.get("small", 0)
        assert all(s.note for s in r.segments if not s.accepted)
    if config == "spec-verification":
        assert [r.text for r in results] == large_only
        assert any(not s.accepted for r in results for s in r.segments)  # some tails go unverified
    limit = await solve(pair, f"arith-v1/{config}", exact)
    assert [r.text for r in limit] == large_only


async def test_bild_small_model_drafts_nothing_past_its_fallback_token(pair):
    """The small model stops in its worker at the token BiLD falls back on (``GenParams.stop_below``): every token it
    writes is proposed or is that fallback token, none is made only to be thrown away."""
    results = await solve(pair, "arith-v1/bild")
    fallbacks = sum(s.tokens for r in results for s in r.segments if (s.note or "").startswith("fallback"))
    assert fallbacks > 0
    assert sum(r.metrics.tokens["small"] for r in results) == sum(r.metrics.proposed for r in results) + fallbacks


async def test_easd_samples_on_real_models_without_moving_rows(pair):
    """Under sampling the gate and the test read entropies, top-N, p and q at a few tokens in the real workers."""
    results = await solve(pair, "arith-v1/easd", ["sampling.temperature=0.8", "sampling.seed=3",
                                                  "policy.entropy_threshold=0.05"])
    for r in results:
        assert r.text == "".join(s.text for s in r.segments if s.accepted) and r.metrics.proposed > 0
    assert any((s.note or "").startswith("entropy gate") for r in results for s in r.segments)


async def test_spec_verification_with_a_companion_model(pair, large_only):
    """The paper's setting on real models: a third (``mid``) worker scores each draft; here the small model itself."""
    workers = {**pair, "mid": pair["small"]}
    cfg = load_config("arith-v1/spec-verification", [*SHORT, "policy.companion=mid", "models.mid.path=evals/arith/models/small"])
    orch = Orchestrator(cfg, workers=workers)
    try:
        results = await orch.asolve_batch(PROBLEMS, concurrency=len(PROBLEMS))
    finally:
        await orch.aclose()
    assert [r.text for r in results] == large_only  # lossless whatever the signals say
    assert all(r.metrics.calls.get("mid", 0) > 0 and r.metrics.proposed > 0 for r in results)
