"""Hierarchical SD, multi-candidate SD and PyramidSD: exact rules on tiny models, then the real arith models.

The scripted models are Markov tables over {0, 1, 2, EOS} (``TableWorker(markov=True)``:
the next-token logits depend on the last token), so a rule that reads the wrong
row or the wrong candidate's context shows up in the joint distribution of two or
three tokens. The lossless policies must fit the large model's exact distribution
(chi-square); PyramidSD must fit it at tau = 0 and fit the draft's (PSD_F) or the
qualifier's (PSD_A) when its thresholds accept everything.
"""

from __future__ import annotations

import asyncio
import collections
import math

import pytest
import torch
from pydantic import ValidationError

from orchestrator import Orchestrator, load_config
from orchestrator.session import ModelHandle, Session
from policies import build_policy, speculative
from policies.divergences import bucket_top_k, divergence
from policies.hierarchical import HierarchicalParams
from policies.multi_candidate import MultiCandidateParams
from policies.pyramid import PyramidParams
from policies.speculative import SpeculativeParams, recursive_accept
from policies.token_level import DraftVerifyPolicy
from tests.scripted import EOS, CharTokenizer, TableWorker
from workers.protocol import GenParams
from workers.sampling import sampling_probs

INF = float("inf")
# rows: empty context, then after 0, 1, 2, EOS. Zeros on both sides: small never writes 1 after 0,
# large never writes 2 after 1, so drafts the target cannot write and targets the draft cannot propose occur.
SMALL = [[0.5, 1.0, 0.0, -1.0], [1.0, -INF, 0.5, -0.5], [0.0, 0.8, 1.2, -1.0], [0.3, 0.2, 1.0, -0.7], [0, 0, 0, 0]]
MID = [[0.2, 0.6, 0.4, -0.8], [0.8, 0.3, 0.6, -0.5], [0.4, 0.5, 1.0, -1.2], [0.9, 0.1, 0.2, -0.4], [0, 0, 0, 0]]
LARGE = [[0.0, 0.3, 1.0, -0.5], [0.6, 0.9, 0.1, -0.2], [1.0, 0.2, -INF, -0.8], [0.2, 1.1, 0.3, -0.6], [0, 0, 0, 0]]


def markov(rows) -> TableWorker:
    return TableWorker(rows, markov=True)


def session(workers: dict, *, max_tokens: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> Session:
    tok = CharTokenizer()
    models = {r: ModelHandle(r, w, tok, EOS, "chars") for r, w in workers.items()}
    return Session(problem="p", models=models, prompt_ids={r: [] for r in models},
                   params=GenParams(temperature=temperature, top_k=top_k, max_tokens=max_tokens),
                   max_tokens=max_tokens, seed=seed)


def exact(rows, length: int, temperature: float = 1.0, top_k: int = 0) -> dict[tuple[int, ...], float]:
    """The table model's distribution over its first ``length`` tokens (ending early at EOS)."""
    out: dict[tuple[int, ...], float] = collections.defaultdict(float)

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] == EOS):
            out[prefix] += mass
            return
        row = torch.tensor(rows[1 + prefix[-1] if prefix else 0], dtype=torch.float32)
        for t, q in enumerate(sampling_probs(row, temperature, top_k).tolist()):
            if q > 0:
                walk((*prefix, t), mass * q)

    walk((), 1.0)
    return dict(out)


def chi_square_p(counts: collections.Counter, expected: dict, n: int) -> float:
    """The chi-square test's p-value of ``counts`` against ``expected`` (cells under 5 expected are pooled)."""
    assert set(counts) <= {k for k, v in expected.items() if v > 0}, set(counts) - set(expected)
    stat, cells, pooled_o, pooled_e = 0.0, 0, 0, 0.0
    for k, v in expected.items():
        if n * v < 5:
            pooled_o, pooled_e = pooled_o + counts[k], pooled_e + n * v
            continue
        stat += (counts[k] - n * v) ** 2 / (n * v)
        cells += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


async def outputs(params, workers: dict, n: int, length: int, **kw) -> collections.Counter:
    """What the policy writes in ``n`` seeded sessions of ``length`` tokens, as token tuples."""
    policy = build_policy(params)
    counts: collections.Counter = collections.Counter()
    for seed in range(n):
        s = session({r: w for r, w in workers.items()}, max_tokens=length, seed=seed, **kw)
        await policy.run(s)
        counts[tuple(s.log("large"))] += 1
    return counts


def trio():
    return {"small": markov(SMALL), "mid": markov(MID), "large": markov(LARGE)}


# ------------------------------------------------------------------ the rules, position by position


@pytest.mark.parametrize(("draws", "asks"), [(16, 4), (1, 4), (1, 1)])
async def test_speculative_sampling_through_draws_fits_the_target(monkeypatch, draws, asks):
    """Lossless SD reads p and q at a few tokens; the residual comes from draws of p (rejection sampling).

    One draw per position makes the residual's later asks common (and, with one ask, its
    last resort: the two rows): every path must still write the large model's distribution,
    here under temperature and top-k, whose zeros the draws must respect.
    """
    monkeypatch.setattr(speculative, "RESIDUAL_DRAWS", draws)
    monkeypatch.setattr(speculative, "RESIDUAL_ASKS", asks)
    workers = {"small": markov(SMALL), "large": markov(LARGE)}
    n = 1500
    counts = await outputs(SpeculativeParams(draft_tokens=2), workers, n, 3, temperature=0.8, top_k=3)
    assert chi_square_p(counts, exact(LARGE, 3, 0.8, 3), n) > 1e-3, counts
    later_asks = [c for c in workers["large"].calls if c == ("score", (c[1][0], 0))]
    assert (len(later_asks) > 0) == (draws == 1)


async def test_speculative_sampling_reads_q_itself_when_a_draft_lacks_it():
    """A subclass drafting without ``sample_logprobs`` (as Speculative Verification may): q comes from a score."""
    class PlainDraft(speculative.SpeculativeDecoding):
        draft = DraftVerifyPolicy.draft

    workers = {"small": markov(SMALL), "large": markov(LARGE)}
    policy, n, counts = PlainDraft(SpeculativeParams(draft_tokens=2)), 800, collections.Counter()
    for seed in range(n):
        s = session(workers, max_tokens=2, seed=seed)
        await policy.run(s)
        counts[tuple(s.log("large"))] += 1
    assert chi_square_p(counts, exact(LARGE, 2), n) > 1e-3, counts


@pytest.mark.parametrize("replacement", [True, False])
def test_recursive_accept_is_lossless_with_and_without_replacement(replacement):
    """k candidates drawn from q (i.i.d., or distinct), all rejected now and then: the token is distributed as p."""
    p = torch.tensor([0.1, 0.6, 0.3, 0.0])  # p has a zero where q has mass; q a zero where p has mass
    q = torch.tensor([0.5, 0.0, 0.3, 0.2])
    rng = torch.Generator().manual_seed(0)
    n, counts, repeats = 12000, collections.Counter(), 0
    for _ in range(n):
        xs = torch.multinomial(q, 3, replacement=replacement, generator=rng).tolist()
        repeats += len(set(xs)) < 3
        counts[recursive_accept(p, q, xs, rng, replacement)[1]] += 1
    assert (repeats > 0) == replacement
    assert chi_square_p(counts, dict(enumerate(p.tolist())), n) > 1e-3, counts


def test_divergences_follow_fsd_conventions():
    p, q = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.25, 0.25, 0.5]])
    assert divergence("tv_div", p, q).item() == pytest.approx(0.5)
    assert divergence("kl_div_reversed", p, q).item() == pytest.approx(math.log(2))  # KL(p || q)
    assert divergence("kl_div", p, q).item() == INF  # KL(q || p): q has mass where p has none
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).nansum() + 0.5 * (q * (q / m).log()).sum()
    assert divergence("js_div", p, q).item() == pytest.approx(js.item())
    assert divergence("js_div", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(
        math.log(2))
    assert divergence("js_div", q, q).item() == 0.0
    bp, bq = bucket_top_k(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.1, 0.2, 0.7]]), 1)
    assert bp[0].tolist() == pytest.approx([0.5, 0.5]) and bq[0].tolist() == pytest.approx([0.1, 0.9])


# ------------------------------------------------------------------ lossless in distribution, end to end


@pytest.mark.parametrize(("draws", "asks"), [(16, 4), (1, 1)])
async def test_hierarchical_fits_the_large_model_over_three_tokens(monkeypatch, draws, asks):
    """T_0 = 1, T_1 = 2: the mid model asks for several small drafts per block; every level verifies.

    Each level reads p and q at a few tokens (q at a residual's draws from the level below), so no
    vocabulary-sized row crosses the protocol, unless the draws are made to run out (one draw, one ask)
    and the residual's last resort reads two rows.
    """
    monkeypatch.setattr(speculative, "RESIDUAL_DRAWS", draws)
    monkeypatch.setattr(speculative, "RESIDUAL_ASKS", asks)
    n, workers = 1200, trio()
    counts = await outputs(HierarchicalParams(draft_tokens=1, mid_tokens=2), workers, n, 3)
    target = exact(LARGE, 3)
    assert chi_square_p(counts, target, n) > 1e-3, counts
    first = collections.Counter()
    for k, c in counts.items():
        first[k[:1]] += c
    assert chi_square_p(first, exact(LARGE, 1), n) > 1e-3, first
    rows = {role: w.rows_sent for role, w in workers.items()}
    assert (sum(rows.values()) == 0) == (draws == 16), rows


async def test_hierarchical_under_temperature_and_top_k_fits_the_sampling_distribution():
    n = 1000
    counts = await outputs(HierarchicalParams(draft_tokens=2, mid_tokens=2), trio(), n, 2, temperature=0.7, top_k=3)
    assert chi_square_p(counts, exact(LARGE, 2, 0.7, 3), n) > 1e-3, counts


@pytest.mark.parametrize("replacement", [True, False])
async def test_multi_candidate_fits_the_large_model_over_two_tokens(replacement):
    n = 1200
    workers = {"small": markov(SMALL), "large": markov(LARGE)}
    counts = await outputs(MultiCandidateParams(candidates=3, draft_tokens=2, replacement=replacement), workers, n, 2)
    assert chi_square_p(counts, exact(LARGE, 2), n) > 1e-3, counts


async def test_multi_candidate_scores_the_candidates_concurrently_and_once_each():
    class Meter:
        """Counts how many score calls are in flight at once (the backend batches those)."""

        def __init__(self, worker):
            self.worker, self.now, self.most, self.calls = worker, 0, 0, []

        def __getattr__(self, name):
            return getattr(self.worker, name)

        async def score(self, prefix, cont, **kw):
            self.now, self.most = self.now + 1, max(self.most, self.now + 1)
            self.calls.append(tuple(cont))
            await asyncio.sleep(0)
            try:
                return await self.worker.score(prefix, cont, **kw)
            finally:
                self.now -= 1

    large = Meter(markov(LARGE))
    s = session({"small": markov(SMALL), "large": large}, max_tokens=3, seed=1)
    await build_policy(MultiCandidateParams(candidates=3, draft_tokens=3, replacement=False)).run(s)
    first_round = large.calls[:3]
    assert large.most == 3 and len(set(first_round)) == 3  # three distinct drafts, one call each, all in flight


# ------------------------------------------------------------------ PyramidSD: its thresholds, both variants


@pytest.mark.parametrize("variant", ["F", "A"])
async def test_pyramid_at_tau_zero_is_the_target_distribution(variant):
    n = 1000
    counts = await outputs(PyramidParams(variant=variant, tau_q=0, tau_t=0, draft_tokens=2, qualifier_tokens=2),
                           trio(), n, 2)
    assert chi_square_p(counts, exact(LARGE, 2), n) > 1e-3, counts


@pytest.mark.parametrize(("variant", "follows"), [("F", SMALL), ("A", MID)])
async def test_pyramid_accepting_everything_writes_the_draft_or_the_qualifier(variant, follows):
    """js_div <= ln 2 < 1: every position passes; F writes the draft's distribution, A the qualifier's."""
    n = 1000
    counts = await outputs(PyramidParams(variant=variant, tau_q=1.0, tau_t=1.0, draft_tokens=2, qualifier_tokens=2),
                           trio(), n, 2)
    assert chi_square_p(counts, exact(follows, 2), n) > 1e-3, counts
    # not lossless, and the test sees it: it writes (1, 2), which the target never does (large's 2 after 1 is -inf)
    target = exact(LARGE, 2)
    assert (1, 2) in counts and target.get((1, 2), 0.0) == 0.0


async def test_pyramid_between_the_limits_differs_from_lossless():
    """tv_div at 0.3: some positions pass, some fall back to the target; neither limit's distribution."""
    n = 1000
    counts = await outputs(PyramidParams(divergence="tv_div", tau_q=0.3, tau_t=0.3, draft_tokens=2,
                                         qualifier_tokens=2), trio(), n, 2)
    for rows in (LARGE, SMALL, MID):
        assert chi_square_p(counts, exact(rows, 2), n) < 1e-6, counts


def test_pyramid_thresholds_are_ordered_and_params_strict():
    with pytest.raises(ValidationError, match="tau_q <= tau_t"):
        PyramidParams(tau_q=0.5, tau_t=0.4)
    with pytest.raises(ValidationError):
        PyramidParams(tau=0.4)
    with pytest.raises(ValidationError):
        HierarchicalParams(mid_tokens=0)


# ------------------------------------------------------------------ greedy: the large model's text exactly

# large writes 2 1 0 EOS; small's argmax misses at the start and after 2, where its second choice is right
GREEDY_SMALL = [[0, 5, 4, -9], [0, 0, 2, 3], [5, 0, 4, -9], [0, 4, 5, -9], [0, 0, 0, 0]]
GREEDY_LARGE = [[0, 4, 5, -9], [0, 0, 0, 9], [5, 0, 4, -9], [0, 5, 4, -9], [0, 0, 0, 0]]


async def greedy_text(params, workers: dict, max_tokens: int = 8) -> tuple[list[int], Session]:
    s = session(workers, max_tokens=max_tokens, temperature=0.0)
    build_policy(params).check(s.models)
    await build_policy(params).run(s)
    return list(s.log("large")), s


@pytest.mark.parametrize("params", [
    HierarchicalParams(draft_tokens=2, mid_tokens=3),
    MultiCandidateParams(candidates=2, draft_tokens=3),
    MultiCandidateParams(candidates=2, draft_tokens=3, replacement=False),
    PyramidParams(tau_q=0, tau_t=0),
    PyramidParams(variant="A", tau_t=0),
], ids=["hierarchical", "multi-candidate", "multi-candidate-distinct", "pyramid-F-0", "pyramid-A-0"])
async def test_greedy_writes_the_large_models_text(params):
    large = markov(GREEDY_LARGE)
    alone = await large.generate([], GenParams(max_tokens=8))
    workers = {"small": markov(GREEDY_SMALL), "mid": markov(GREEDY_SMALL), "large": large}
    ids, s = await greedy_text(params, workers)
    assert ids == alone.token_ids and s.metrics.finish_reason == "eos"
    assert sum(s.metrics.accepted_tokens.values()) == len(ids)
    assert s.reasoning == "".join(chr(t) for t in ids if t != EOS)


async def test_multi_candidate_keeps_a_second_candidate_the_single_draft_rule_rejects():
    """The small model's argmax misses the large one's first token, its second choice hits it."""
    workers = {"small": markov(GREEDY_SMALL), "large": markov(GREEDY_LARGE)}
    _, single = await greedy_text(SpeculativeParams(draft_tokens=3), workers)
    _, multi = await greedy_text(MultiCandidateParams(candidates=2, draft_tokens=3), workers)
    assert multi.metrics.accepted > single.metrics.accepted
    assert multi.segments[0].author == "small"


async def test_hierarchical_names_each_tokens_author_and_needs_a_mid_model():
    workers = {"small": markov(GREEDY_SMALL), "mid": markov(GREEDY_LARGE), "large": markov(GREEDY_LARGE)}
    _, s = await greedy_text(HierarchicalParams(draft_tokens=2, mid_tokens=4), workers)
    authors = {g.author for g in s.segments}
    assert "mid" in authors  # mid == large here: mid's replacements are what large keeps
    assert s.metrics.tokens.get("mid", 0) > 0 and s.metrics.forward_passes["mid"] > 0
    two = session({"small": markov(SMALL), "large": markov(LARGE)}, max_tokens=2)
    with pytest.raises(ValueError, match="mid"):
        build_policy(HierarchicalParams()).check(two.models)


# ------------------------------------------------------------------ the real arith models

PROBLEMS = ["53 + 51 - 6 + 20", "12 + 34 - 5 + 9"]


@pytest.fixture(scope="module", params=["hf", "vllm"])
def models(request, engines):
    """The arith pair, the small model standing in as mid (the first arith world has no mid model)."""
    return {"small": engines(request.param, "small"), "mid": engines(request.param, "small"),
            "large": engines(request.param, "large")}


async def solve(models, config: str, overrides=(), max_tokens: int = 80):
    """Greedy runs, cut at ``max_tokens`` (a cut text must still equal LargeOnly's cut at the same budget)."""
    orch = Orchestrator(load_config(config, [f"sampling.max_tokens={max_tokens}", *overrides]), workers=models)
    try:
        return await orch.asolve_batch(PROBLEMS, concurrency=len(PROBLEMS))
    finally:
        await orch.aclose()


@pytest.mark.parametrize(("config", "overrides"), [
    ("hierarchical", []), ("multi-candidate", []), ("multi-candidate", ["policy.replacement=false"]),
    ("pyramid", ["policy.tau_q=0", "policy.tau_t=0", "policy.draft_tokens=1", "policy.qualifier_tokens=1"]),
], ids=["hierarchical", "multi-candidate", "multi-candidate-distinct", "pyramid-tau-0"])
async def test_real_models_greedy_write_large_only_text(models, config, overrides):
    base = await solve(models, "arith-v1/large-only")
    results = await solve(models, f"arith-v1/{config}", overrides)
    assert [r.text for r in results] == [r.text for r in base]
    for r in results:
        assert r.text == "".join(g.text for g in r.segments if g.accepted)
        assert sum(r.metrics.accepted_tokens.values()) <= sum(r.metrics.tokens.values())
    accepted = sum(r.metrics.accepted for r in results)
    # tau 0 keeps a draft token only where two real models' distributions are identical: never, so none is kept
    assert accepted == 0 if config == "pyramid" else accepted > 0


async def test_real_models_pyramid_solves_with_a_consistent_trace(models):
    for r in await solve(models, "arith-v1/pyramid", max_tokens=200):
        assert r.answer is not None and r.answer.lstrip("-").isdigit()
        assert r.text == "".join(g.text for g in r.segments if g.accepted)
        assert {g.author for g in r.segments} <= {"small", "mid", "large"}
        assert r.metrics.accepted <= r.metrics.proposed


@pytest.mark.parametrize("config", ["hierarchical", "pyramid"])
async def test_real_models_sample_with_a_consistent_trace(models, config):
    """Under sampling each level's reads run in the real workers: hierarchical's p and q at a few tokens and
    draws, PyramidSD-A's lossless qualifier beside the rows its fuzzy target reads."""
    overrides = ["sampling.temperature=0.8", "sampling.seed=5", *(["policy.variant=A"] if config == "pyramid" else [])]
    results = await solve(models, f"arith-v1/{config}", overrides)
    for r in results:
        assert r.text and r.text == "".join(g.text for g in r.segments if g.accepted)
        assert r.metrics.accepted <= r.metrics.proposed
    assert sum(r.metrics.accepted for r in results) > 0
