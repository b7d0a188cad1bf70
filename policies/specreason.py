"""SpecReason (Pan et al., 2025): the small model proposes a step, the large model judges it.

A step is the small model's text up to the delimiter (``\\n\\n``), at most
``max_step_tokens`` long. The large model scores it in one prefill-only pass over
``context + step + judge suffix`` (the context is already in its KV cache, so the
pass costs about the suffix); the step is kept if the score reaches
``threshold``, else the large model writes that step itself.

Judges:
- ``prompt`` (the paper's): the large model answers a 0-9 rating prompt; the
  score is read from the log-probabilities of the digit tokens. ``greedy`` takes
  the most likely digit, and 0 when digits hold under half of the probability
  (the paper scores a non-digit answer 0); ``expected`` is the mean digit under
  the renormalised digit distribution (the paper's ``average``).
- ``likelihood`` (training-free, for models that cannot follow a rating prompt):
  9 x the large model's geometric-mean probability of the step's own tokens.

Options from the paper: the first ``first_n_large`` steps by the large model; a
token budget counting accepted tokens only; stop on a boxed answer or on a step
that repeats the previous one.

Beyond the paper (its "future work"), ``pipeline``: while the large model judges
step k, the small model already drafts step k+1 as if k were accepted; the draft
is discarded when k is rejected. With the two models on separate devices the
judge leaves the critical path. Greedy outputs are identical either way.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.base import Policy, PolicyParams
from policies.judge_prompt import DEFAULT_INSTRUCTION, DEFAULT_PREFILL, judge_suffix_text

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle, Session
    from workers.protocol import Generation


class SpecReasonParams(PolicyParams):
    type: Literal["specreason"] = "specreason"
    threshold: float = Field(7.0, ge=0, le=9)
    judge: Literal["prompt", "likelihood"] = "prompt"
    score_method: Literal["greedy", "expected"] = "greedy"
    max_step_tokens: int = Field(512, ge=1)
    first_n_large: int = Field(0, ge=0)
    delimiter: str = "\n\n"
    pipeline: bool = Field(True, description="draft the next small step while the current one is judged")
    judge_instruction: str = DEFAULT_INSTRUCTION
    judge_prefill: str = DEFAULT_PREFILL


class SpecReason(Policy):
    name = "specreason"
    roles = ("small", "large")
    params: SpecReasonParams

    def check(self, models: dict[str, ModelHandle]) -> None:
        super().check(models)
        if self.params.judge == "prompt":
            large = models["large"]
            self._suffix = large.encode(judge_suffix_text(large.tokenizer, self.params.judge_instruction,
                                                          self.params.judge_prefill))
            self._digits = {}
            for d in range(10):
                ids = large.encode(str(d))
                if len(ids) != 1:
                    raise ValueError(f"the large model's tokenizer splits the digit {d}: cannot read a 0-9 judge score")
                self._digits[ids[0]] = d

    async def judge(self, session: Session, step: str) -> float:
        p = self.params
        if p.judge == "likelihood":
            prefix = session.ids("large")
            cont = session.ids("large", step)[len(prefix):]
            if not cont:
                return 9.0
            s = await session.score("large", prefix, cont)
            return 9.0 * math.exp(sum(s.logprobs) / len(s.logprobs))
        ids = session.ids("large", step + p.delimiter) + self._suffix
        lp = await session.next_token_logprobs("large", ids, list(self._digits))
        probs = {self._digits[t]: math.exp(v) for t, v in lp.items()}
        mass = sum(probs.values())
        if p.score_method == "expected":
            return sum(d * q for d, q in probs.items()) / mass if mass > 0 else 0.0
        return float(max(probs, key=probs.get)) if mass >= 0.5 else 0.0

    async def _step(self, session: Session, role: str, extra: str = "") -> Generation:
        p = self.params
        return await session.generate(role, ids=session.ids(role, extra), stop=[p.delimiter], max_tokens=p.max_step_tokens)

    async def run(self, session: Session) -> None:
        p = self.params
        previous = None
        n_steps = 0
        ahead: asyncio.Future | None = None  # the small model's next step, drafted while this one is judged
        try:
            while not session.finished and not session.out_of_budget:
                score = None
                if n_steps < p.first_n_large:
                    author, g = "large", await self._step(session, "large")
                else:
                    author = "small"
                    g = await ahead if ahead is not None else await self._step(session, "small")
                    ahead = None
                    judging = asyncio.ensure_future(self.judge(session, g.text))
                    if p.pipeline and g.finish_reason == "stop":
                        ahead = asyncio.ensure_future(self._step(session, "small", g.text + p.delimiter))
                    score = await judging
                    session.metrics.proposed += 1
                    if score >= p.threshold:
                        session.metrics.accepted += 1
                    else:
                        session.reject("small", g.text, len(g.token_ids), score=score)
                        session.metrics.handoffs += 1
                        if ahead is not None:  # drafted on a rejected step: worthless
                            ahead.cancel()
                            ahead = None
                        author, score = "large", None
                        g = await self._step(session, "large")
                n_steps += 1
                step = g.text
                session.append(author, step + (p.delimiter if g.finish_reason == "stop" else ""), len(g.token_ids),
                               score=score)
                if g.finish_reason == "eos":
                    session.finish("eos")
                elif step.strip() and step == previous:
                    session.finish("repeat")
                previous = step
        finally:
            if ahead is not None:
                ahead.cancel()
