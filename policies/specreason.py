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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.base import Policy, PolicyParams
from policies.judge_prompt import DEFAULT_INSTRUCTION, DEFAULT_PREFILL, judge_suffix_text

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle, Session


class SpecReasonParams(PolicyParams):
    type: Literal["specreason"] = "specreason"
    threshold: float = Field(7.0, ge=0, le=9)
    judge: Literal["prompt", "likelihood"] = "prompt"
    score_method: Literal["greedy", "expected"] = "greedy"
    max_step_tokens: int = Field(512, ge=1)
    first_n_large: int = Field(0, ge=0)
    delimiter: str = "\n\n"
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
            large = session.models["large"]
            prefix = session.ids("large")
            cont = large.encode(session.reasoning + step)[len(prefix) - len(session.prompt_ids["large"]):]
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

    async def run(self, session: Session) -> None:
        p = self.params
        previous = None
        n_steps = 0
        while not session.finished and not session.out_of_budget:
            author = "large" if n_steps < p.first_n_large else "small"
            g = await session.generate(author, stop=[p.delimiter], max_tokens=p.max_step_tokens)
            step, score = g.text, None
            if author == "small":
                score = await self.judge(session, step)
                session.metrics.proposed += 1
                if score >= p.threshold:
                    session.metrics.accepted += 1
                else:
                    session.reject("small", step, len(g.token_ids), score=score)
                    session.metrics.handoffs += 1
                    author, score = "large", None
                    g = await session.generate("large", stop=[p.delimiter], max_tokens=p.max_step_tokens)
                    step = g.text
            n_steps += 1
            ended = g.finish_reason == "eos"
            session.append(author, step + (p.delimiter if g.finish_reason == "stop" else ""), len(g.token_ids),
                           score=score)
            if ended:
                session.finish("eos")
            elif step.strip() and step == previous:
                session.finish("repeat")
            previous = step
