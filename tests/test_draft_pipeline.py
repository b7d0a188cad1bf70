"""Token-level rounds pipelined: the next draft is made while the large model verifies (``DraftVerifyPolicy.run``).

Scripted workers whose texts are known exactly; the same policies run pipelined on
the real arith models in ``test_policies_real.py`` and ``test_seed_policies_lossless.py``
(lossless sampling through drafts made ahead).
"""

from __future__ import annotations

import asyncio
import math

import pytest
from pydantic import ValidationError

from policies import build_policy
from policies.bild import BiLDParams
from policies.consultant import ConsultantParams
from policies.multi_candidate import MultiCandidateParams
from policies.specreason import SpecReasonParams
from policies.speculative import SpeculativeParams
from tests.scripted import EOS, ChoiceWorker, document, make_session
from workers.protocol import TokenLogprob

LARGE_DOC = "the sum 12 + 30 is 42; then 42 - 2 is 40, and 40 + 1 is 41. " * 3
SMALL_DOC = LARGE_DOC.replace("42 - 2", "42 - 3").replace("is 41", "is 44")  # wrong in places: rejected drafts


class Logged:
    """A worker whose calls go into a shared timeline as (role, "start" | "end", call name).

    Each call yields to the event loop before it is served, so calls started together
    are in flight together (as on real workers) and the timeline shows what overlapped.
    """

    def __init__(self, role: str, worker, timeline: list[tuple[str, str, str]]):
        self.role, self.worker, self.timeline = role, worker, timeline

    def __getattr__(self, name: str):
        attr = getattr(self.worker, name)
        if name not in ("generate", "score"):
            return attr

        async def call(*args, **kwargs):
            self.timeline.append((self.role, "start", name))
            await asyncio.sleep(0)
            out = await attr(*args, **kwargs)
            self.timeline.append((self.role, "end", name))
            return out

        return call


async def run(params, timeline: list, docs: tuple[str, str] = (SMALL_DOC, LARGE_DOC), judge=None) -> object:
    small = Logged("small", ChoiceWorker(document(docs[0], strict=False)), timeline)
    large = Logged("large", ChoiceWorker(document(docs[1], strict=False), judge=judge), timeline)
    s = make_session(small, large, max_tokens=400)
    pol = build_policy(params)
    pol.check(s.models)
    await pol.run(s)
    return s.result(pol.name)


def rounds_without_a_draft_call(timeline: list[tuple[str, str, str]]) -> int:
    """Rounds whose verification started with no small-model call started since the previous one ended."""
    n, since = 0, None  # small calls started since the last verification ended (None: before the first)
    for role, event, _ in timeline:
        if role == "large" and event == "start":
            n += since == 0
        elif role == "large" and event == "end":
            since = 0
        elif role == "small" and event == "start" and since is not None:
            since += 1
    return n


def overlaps(timeline: list[tuple[str, str, str]]) -> int:
    """Small-model calls started while a large-model call was in flight."""
    n, large_busy = 0, 0
    for role, event, _ in timeline:
        if role == "large":
            large_busy += 1 if event == "start" else -1
        elif event == "start" and large_busy:
            n += 1
    return n


@pytest.mark.parametrize("make", [lambda **kw: ConsultantParams(draft_tokens=4, **kw),
                                  lambda **kw: SpeculativeParams(draft_tokens=4, **kw)])
async def test_a_pipelined_run_writes_the_serial_text_with_drafts_made_during_verification(make):
    serial_log, pipe_log = [], []
    others = asyncio.all_tasks()  # this task, and those of engines other tests left running in the session's loop
    serial = await run(make(pipeline=False), serial_log)
    pipe = await run(make(), pipe_log)
    assert pipe.text == serial.text and LARGE_DOC.startswith(serial.text[:40])
    assert "42 - 3" not in pipe.text  # the small model's wrong tokens were turned down
    m, n = pipe.metrics, serial.metrics
    assert (m.proposed, m.accepted, m.handoffs) == (n.proposed, n.accepted, n.handoffs)  # the same rounds
    assert m.accepted_tokens == n.accepted_tokens and m.calls["large"] == n.calls["large"]
    # serially the small model waits for every verification; pipelined it drafts meanwhile ...
    assert overlaps(serial_log) == 0 and overlaps(pipe_log) >= m.calls["large"] - 1
    # ... and most rounds (the small model was right all through) verify at once, no draft call between
    assert rounds_without_a_draft_call(serial_log) == 0
    assert rounds_without_a_draft_call(pipe_log) >= m.calls["large"] // 2
    assert asyncio.all_tasks() - others == set()  # no draft left running


async def test_a_draft_made_ahead_never_passes_the_budget():
    for budget in range(1, 12):
        small, large = ChoiceWorker(document(LARGE_DOC)), ChoiceWorker(document(LARGE_DOC))
        s = make_session(small, large, max_tokens=budget)
        await build_policy(ConsultantParams(draft_tokens=4)).run(s)
        assert s.accepted_tokens == budget and s.result("consultant").text == LARGE_DOC[:budget]
        assert all(c[1][1] <= budget for c in small.calls if c[0] == "generate")  # max_tokens of every draft


def draft_lengths(worker: ChoiceWorker, prompt: int = 1, budget: int = 400) -> list[tuple[int, int]]:
    """(max_tokens, budget left) of each draft call, in order."""
    return [(m, budget - (n - prompt)) for name, (n, m) in worker.calls if name == "generate"]


@pytest.mark.parametrize("make", [ConsultantParams, SpeculativeParams])
async def test_the_heuristic_schedule_lengthens_drafts_kept_whole_and_shortens_rejected_ones(make):
    """``draft_schedule: heuristic`` (HF's): +2 after a round that kept its whole draft, -1 (not under 1) after any
    rejection. A small model always right drafts 4, 6, 8, ... (up to 64 and the budget); one always wrong 4, 3, 2, 1, 1."""
    for doc, expect in ((LARGE_DOC, lambda i: 4 + 2 * i), ("~" * 200, lambda i: max(1, 4 - i))):
        small, large = ChoiceWorker(document(doc, strict=False)), ChoiceWorker(document(LARGE_DOC, strict=False))
        s = make_session(small, large, max_tokens=400)
        await build_policy(make(draft_tokens=4, draft_schedule="heuristic", pipeline=False)).run(s)
        assert s.result("p").text == LARGE_DOC
        lengths = draft_lengths(small)
        assert len(lengths) > 5 and lengths == [(min(expect(i), 64, left), left) for i, (_, left) in enumerate(lengths)]


@pytest.mark.parametrize("make", [ConsultantParams, SpeculativeParams])
async def test_a_pipelined_heuristic_schedule_makes_the_serial_rounds(make):
    """Drafts made ahead are as long as the schedule makes the next round's when the whole draft is kept, so
    pipelined and serial runs make the same rounds; the constant schedule makes others."""
    serial_log, pipe_log, constant_log = [], [], []
    serial = await run(make(draft_tokens=3, draft_schedule="heuristic", pipeline=False), serial_log)
    pipe = await run(make(draft_tokens=3, draft_schedule="heuristic"), pipe_log)
    constant = await run(make(draft_tokens=3, pipeline=False), constant_log)
    assert pipe.text == serial.text == constant.text and "42 - 3" not in pipe.text
    m, n, c = pipe.metrics, serial.metrics, constant.metrics
    assert (m.proposed, m.accepted, m.handoffs) == (n.proposed, n.accepted, n.handoffs)
    assert m.calls["large"] == n.calls["large"] < c.calls["large"]  # longer drafts where the small model is right
    assert rounds_without_a_draft_call(pipe_log) >= m.calls["large"] // 2


class Unsure(ChoiceWorker):
    """``SMALL_DOC``'s writer with top-2 logprobs: unsure (0.5) where it differs from ``LARGE_DOC``, with
    ``second`` (by default the large document's character) as its second choice; sure (0.9) elsewhere."""

    def __init__(self, second=lambda pos: LARGE_DOC[pos]):
        super().__init__(document(SMALL_DOC, strict=False))
        self.second = second

    async def generate(self, prompt_ids, params):
        g = await super().generate(prompt_ids, params)
        if params.logprobs is None:
            return g
        start, lps = len(self._context(prompt_ids)), []
        for i, t in enumerate(g.token_ids):
            pos = start + i
            unsure = t != EOS and SMALL_DOC[pos] != LARGE_DOC[pos]
            alt = ord(self.second(pos)) if unsure else ord("?")
            lps.append(TokenLogprob(token_id=t, logprob=math.log(0.5 if unsure else 0.9),
                                    top={t: math.log(0.5 if unsure else 0.9), alt: math.log(0.4 if unsure else 0.05)}))
        return g.model_copy(update={"logprobs": lps})


@pytest.mark.parametrize("make", [ConsultantParams, SpeculativeParams])
async def test_a_draft_made_ahead_for_a_rejection_is_the_next_round_where_the_guess_holds(make):
    """``ahead_alternative``: beside the draft made as if the large model keeps everything, another from the
    draft's least sure position with the small model's second choice there. Where the large model rejects there and
    writes that token, the next round verifies at once; where it writes another, a fresh draft follows. The text is
    the serial run's either way."""
    async def go(params, small, log):
        s = make_session(Logged("small", small, log), Logged("large", ChoiceWorker(document(LARGE_DOC, strict=False)),
                                                              log), max_tokens=400)
        await build_policy(params).run(s)
        return s.result("p")

    serial = await go(make(draft_tokens=8, pipeline=False), Unsure(), [])
    plain_log, right_log, wrong_log = [], [], []
    others = asyncio.all_tasks()
    plain = await go(make(draft_tokens=8), Unsure(), plain_log)
    right = await go(make(draft_tokens=8, ahead_alternative=0.8), Unsure(), right_log)
    wrong = await go(make(draft_tokens=8, ahead_alternative=0.8), Unsure(second=lambda pos: "#"), wrong_log)
    assert serial.text == plain.text == right.text == wrong.text == LARGE_DOC
    m = serial.metrics
    assert (right.metrics.proposed, right.metrics.accepted, right.metrics.handoffs) == (m.proposed, m.accepted,
                                                                                         m.handoffs)
    assert m.handoffs >= 4
    at_once = [rounds_without_a_draft_call(log) for log in (plain_log, right_log, wrong_log)]
    assert at_once[1] == at_once[0] + m.handoffs  # every rejection's next round was drafted ahead
    assert at_once[2] == at_once[0]  # a wrong guess: fresh drafts, as without it
    assert asyncio.all_tasks() - others == set()  # no draft left running


def test_policies_whose_drafts_follow_rules_of_their_own_refuse_a_schedule():
    with pytest.raises(ValidationError, match="draft_schedule"):
        BiLDParams(draft_schedule="heuristic")
    with pytest.raises(ValidationError, match="draft_schedule"):
        ConsultantParams(draft_schedule="linear")
    with pytest.raises(ValidationError, match="ahead_alternative"):
        BiLDParams(ahead_alternative=0.5)


@pytest.mark.parametrize("params", [BiLDParams, MultiCandidateParams])
def test_policies_whose_drafts_act_on_their_own_refuse_pipelining(params):
    assert params().pipeline is False
    with pytest.raises(ValidationError, match="pipeline"):
        params(pipeline=True)


@pytest.mark.parametrize(("hosts", "apart"), [((None, None), True), ((7, 8), True), ((7, 7), False), ((7, None), True)])
def test_rounds_overlap_by_default_only_when_the_engines_can_work_at_once(hosts, apart):
    """Two engines in one process (an in-process hf pair) take turns on its GIL: overlapping them only costs."""
    s = make_session(ChoiceWorker(document(LARGE_DOC)), ChoiceWorker(document(LARGE_DOC)))
    s.models["small"].process, s.models["large"].process = hosts
    assert build_policy(ConsultantParams()).pipelined(s) is apart
    assert build_policy(ConsultantParams(pipeline=True)).pipelined(s) is True
    assert build_policy(ConsultantParams(pipeline=False)).pipelined(s) is False


async def test_specreason_writes_the_large_step_while_the_small_one_is_drafted_and_judged():
    """``rewrite_ahead``: each judged step's large-model version starts with the small draft and is the step used
    when the judge rejects the draft: the text and decisions of the serial run, with the calls overlapping."""
    docs = ("".join(f"small step {i}.\n\n" for i in range(12)), "".join(f"large step {i}.\n\n" for i in range(12)))
    judge = lambda ctx: 9 if ctx.count("\n\n") % 3 == 0 else 2  # noqa: E731 -- some steps kept, most rejected
    serial_log, ahead_log = [], []
    serial = await run(SpecReasonParams(pipeline=False, rewrite_ahead=False), serial_log, docs, judge)
    others = asyncio.all_tasks()
    ahead = await run(SpecReasonParams(pipeline=False, rewrite_ahead=True), ahead_log, docs, judge)
    m, n = ahead.metrics, serial.metrics
    assert ahead.text == serial.text and "small step" in ahead.text and "large step" in ahead.text
    assert (m.proposed, m.accepted, m.handoffs) == (n.proposed, n.accepted, n.handoffs) and 0 < n.accepted < n.proposed
    assert [(g.author, g.accepted) for g in ahead.segments] == [(g.author, g.accepted) for g in serial.segments]
    large_steps = [e for e in ahead_log if e == ("large", "start", "generate")]
    assert len(large_steps) == n.proposed  # one per judged step, kept or not
    def beside(log):  # large-model steps started while a small-model draft was in flight
        busy, n = 0, 0
        for role, event, name in log:
            busy += (role == "small") * (1 if event == "start" else -1)
            n += (role, event, name) == ("large", "start", "generate") and busy > 0
        return n

    assert beside(serial_log) == 0 and beside(ahead_log) == n.proposed  # each written beside its draft
    assert asyncio.all_tasks() - others == set()
