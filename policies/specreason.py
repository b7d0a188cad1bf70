"""SpecReason (Pan et al., 2025): the small model proposes a step, the large model judges it.

A step is the small model's text up to the delimiter (``\\n\\n``), at most
``max_step_tokens`` long. The large model scores it in one prefill-only pass over
``context + step + judge suffix`` (the context is already in its KV cache, so the
pass costs about the suffix); the step is kept if the score reaches
``threshold``, else the large model writes that step itself.

Judges:
- ``prompt`` (the paper's): the large model answers a 0-9 rating prompt in one
  prefill-only pass that returns the top-10 of the next-token distribution, read
  as the reference code reads it (``process_logprobs``): ``greedy`` takes the most
  likely token over the whole vocabulary, a digit is the score and anything else
  scores 0; ``expected`` (the reference's ``average``) is the mean digit under the
  digits found among the top-10, renormalised (0 when there are none).
- ``likelihood`` (training-free, for models that cannot follow a rating prompt):
  9 x the large model's geometric-mean probability of the step's own tokens.

As in the reference loop: the first ``first_n_large`` steps come from the large
model unjudged; a step that contains an answer marker (``boxed``, ``Answer:``,
``ANSWER:``) ends the request; ``</think>`` is removed from a step without one; a
step cut at ``max_step_tokens`` is joined to the next with the delimiter like any
other; the request also ends when a step repeats the previous one (from the third
step on) or the accepted tokens reach the budget. Here the budget also caps each
step, so a run never writes more than ``max_tokens``; an EOS ends the request (the
reference's chat API would open a new turn).

Beyond the paper (its "future work"), ``pipeline``: while the large model judges
step k, the small model already drafts step k+1 as if k were accepted, within the
budget left after k; the draft is discarded when k is rejected. With the two models
on separate devices the judge leaves the critical path; by default it runs when the
two engines can work at once (``policies.base.engines_apart``) and the judge has kept
at least half of this request's steps so far (or none was judged yet). Greedy
outputs, budget included, are identical either way.

Also beyond the paper, ``rewrite_ahead``: the large model starts writing step k
from the same context while the small model drafts it and the large model judges
it, and the step it writes is used if the judge rejects the draft (dropped, its
call cancelled, if the draft is kept). Where the judge turns down most steps the
rejected step's draft and judge pass leave the critical path: the step costs about
the large model's own writing instead of all three in turn. By default it runs when
the engines can work at once and the judge has rejected more than half of this
request's steps so far (at least one judged); the step written is the one the
large model would write after the rejection (same context and budget), so greedy
outputs are identical either way. By default, then, each step makes one bet, the
one this request's judge history favours: on the draft being kept (the next draft
made ahead) or on its being rejected (the large model's step made ahead).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.base import Policy, PolicyParams, discard, engines_apart
from policies.judge_prompt import DEFAULT_INSTRUCTION, DEFAULT_PREFILL, judge_suffix_ids

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle, Session
    from orchestrator.token_log import Piece
    from workers.protocol import Generation


class SpecReasonParams(PolicyParams):
    type: Literal["specreason"] = "specreason"
    threshold: float = Field(7.0, ge=0, le=9)
    judge: Literal["prompt", "likelihood"] = "prompt"
    score_method: Literal["greedy", "expected"] = "greedy"
    max_step_tokens: int = Field(512, ge=1)
    first_n_large: int = Field(0, ge=0)
    delimiter: str = "\n\n"
    pipeline: bool | None = Field(None, description="draft the next small step while the current one is judged; "
                                                  "None: when the two engines can work at once "
                                                  "(policies.base.engines_apart) and the judge has kept at least "
                                                  "half of this request's steps (or judged none yet)")
    rewrite_ahead: bool | None = Field(None, description="start the large model's step while the small one's is "
                                                       "drafted and judged, used if the judge rejects it; None: when "
                                                       "the engines can work at once and the judge has rejected more "
                                                       "than half of this request's steps")
    judge_instruction: str = DEFAULT_INSTRUCTION
    judge_prefill: str = DEFAULT_PREFILL
    answer_markers: list[str] = Field(["boxed", "Answer:", "ANSWER:"], description="a step with one ends the request")


JUDGE_TOP_K = 10  # the reference asks the judge pass for top_logprobs=10


def read_score(top: dict[int, float], decode: Callable[[list[int]], str], method: str) -> float:
    """A 0-9 judge score from the top-k of the judge position, as the reference reads it."""
    digits = {t: lp for t, lp in top.items() if decode([t]).isdigit()}
    if method == "greedy":
        best = max(top, key=top.get) if top else None
        return float(int(decode([best]))) if best in digits else 0.0
    probs = {int(decode([t])): math.exp(lp) for t, lp in digits.items()}
    mass = sum(probs.values())
    return sum(d * q for d, q in probs.items()) / mass if mass > 0 else 0.0


class SpecReason(Policy):
    name = "specreason"
    roles = ("small", "large")
    params: SpecReasonParams

    def check(self, models: dict[str, ModelHandle]) -> None:
        super().check(models)
        if self.params.judge == "prompt":  # fail at start-up if the template cannot frame a judge request
            self._suffix(models["large"])

    def _suffix(self, large: ModelHandle) -> tuple[int, ...]:
        return judge_suffix_ids(large.tokenizer, self.params.judge_instruction, self.params.judge_prefill)

    async def judge(self, session: Session, g: Generation) -> float:
        """Score the small model's step ``g`` (0-9) as the next step of the reasoning."""
        p = self.params
        if p.judge == "likelihood":
            prefix, cont = session.split("large", session.piece("small", g, text=g.text))
            if not cont:
                return 9.0
            s = await session.score("large", prefix, cont)
            return 9.0 * math.exp(sum(s.logprobs) / len(s.logprobs))
        ids = session.view("large", session.piece("small", g, then=p.delimiter))  # a fresh list: extend it in place
        ids.extend(self._suffix(session.models["large"]))
        read = await session.next_token_logprobs("large", ids, [], top_k=JUDGE_TOP_K)
        return read_score(read.top, session.models["large"].decode, p.score_method)

    def _has_answer(self, step: str) -> bool:
        return any(m in step for m in self.params.answer_markers)

    def _kept(self, g: Generation) -> tuple[str, str]:
        """``(then, text)``: an accepted step is its text, ``</think>`` dropped unless it answers, then the delimiter."""
        then = "" if g.finish_reason == "eos" else self.params.delimiter
        step = g.text if self._has_answer(g.text) else g.text.replace("</think>", "")
        return then, step + then

    async def _step(self, session: Session, role: str, *pieces: Piece, budget: int | None = None) -> Generation:
        p = self.params
        budget = session.budget_left if budget is None else budget
        return await session.generate(role, ids=session.view(role, *pieces), stop=[p.delimiter],
                                      max_tokens=min(p.max_step_tokens, budget))

    def _draft_ahead(self, session: Session, g: Generation) -> asyncio.Future | None:
        """Start drafting the step after ``g`` as if ``g`` were accepted, within the budget left after it."""
        budget = session.budget_left - len(g.token_ids)
        if g.finish_reason == "eos" or budget <= 0 or self._has_answer(g.text):
            return None  # accepting g ends the request: nothing comes after it
        then, text = self._kept(g)
        return asyncio.ensure_future(self._step(session, "small", session.piece("small", g, then, text), budget=budget))

    def _bets(self, session: Session, apart: bool) -> tuple[bool, bool]:
        """(draft the next step ahead, write this step's large version ahead): ``pipeline``, ``rewrite_ahead``.

        By default, where the engines can work at once, the one this request's judge history favours.
        """
        m = session.metrics
        kept_mostly = m.accepted >= m.proposed / 2  # also when nothing was judged yet
        p = self.params
        return (apart and kept_mostly if p.pipeline is None else p.pipeline,
                apart and not kept_mostly if p.rewrite_ahead is None else p.rewrite_ahead)

    async def run(self, session: Session) -> None:
        p = self.params
        apart = engines_apart(session, "small", "large")
        previous = None
        n_steps = 0
        ahead: asyncio.Future | None = None  # the small model's next step, drafted while this one is judged
        rewrite: asyncio.Future | None = None  # the large model's version of this step, written meanwhile
        try:
            while not session.finished and not session.out_of_budget:
                score = None
                if n_steps < p.first_n_large:
                    author, g = "large", await self._step(session, "large")
                else:
                    author = "small"
                    pipelined, rewrites = self._bets(session, apart)
                    if rewrites:
                        rewrite = asyncio.ensure_future(self._step(session, "large"))
                    g = await ahead if ahead is not None else await self._step(session, "small")
                    ahead = None
                    judging = asyncio.ensure_future(self.judge(session, g))
                    if pipelined:
                        ahead = self._draft_ahead(session, g)
                    score = await judging
                    if score >= p.threshold:
                        session.tally(proposed=1, accepted=1)
                        if rewrite is not None:  # the draft stands: the large model's version is not needed
                            discard(rewrite)
                    else:
                        session.tally(proposed=1, handoffs=1)
                        session.reject("small", g.text, len(g.token_ids), score=score)
                        if ahead is not None:  # drafted on a rejected step: worthless
                            discard(ahead)
                            ahead = None
                        author, score = "large", None
                        g = await rewrite if rewrite is not None else await self._step(session, "large")
                    rewrite = None
                n_steps += 1
                then, step = self._kept(g)
                session.accept(author, g, then=then, text=step, score=score)
                if session.finished:  # EOS
                    break
                if self._has_answer(step):
                    session.finish("answer")
                elif n_steps > 2 and step == previous:
                    session.finish("repeat")
                previous = step
        finally:
            for call in (ahead, rewrite):
                if call is not None:
                    discard(call)

