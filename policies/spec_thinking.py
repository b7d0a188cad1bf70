"""Speculative Thinking (Yang et al., 2025): the large model takes over at reflection points.

The small model writes up to each delimiter (``\\n\\n``), then probes ``n1``
tokens. The probe is classified by cue words: more affirmation than reflection
cues is an affirmation, otherwise any cue is a reflection (verification cues count
as reflection, a tie too), no cue a plain statement.

- reflection or affirmation: the large model writes ``n1`` tokens from the same
  point instead (the probe is dropped); if that text carries a verification cue
  it continues for ``n2`` more tokens; a reflection raises the negativity count;
- too many reflections (count >= ``neg_threshold``): the review prompt is
  inserted and the large model writes ``n3`` tokens; the count resets, ``n3`` and
  the threshold grow (``n3_step``/``neg_step``, capped), as in the reference code;
- a statement: the probe is discarded and the small model goes on from the
  delimiter, writing afresh up to the next one, where the trigger is checked
  again (the reference loop exactly). Keeping the probe instead would not be the
  same: under sampling the kept text would be conditioned on being a statement,
  and under greedy decoding a probe that crosses a delimiter would skip the
  trigger check there. Under sampling the price is a second small-model pass
  over the probe's tokens (their prompt is served from the prefix cache). Under
  greedy decoding the resample would write the probe again token for token, so
  when the probe reaches a delimiter its text up to there is taken as the
  resampled segment (same text, same trigger check, no second pass); a probe
  without a delimiter is resampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.base import Policy, PolicyParams

from workers.protocol import Generation

if TYPE_CHECKING:
    from orchestrator.session import Session


class SpecThinkingParams(PolicyParams):
    type: Literal["spec-thinking"] = "spec-thinking"
    delimiter: str = "\n\n"
    n1: int = Field(20, ge=1, description="probe and affirmation/reflection burst length")
    n2: int = Field(125, ge=0, description="verification burst length")
    n3: int = Field(125, ge=1, description="initial excessive-reflection review length")
    n3_step: int = Field(25, ge=0)
    n3_max: int = Field(200, ge=1)
    neg_threshold: int = Field(15, ge=1)
    neg_step: int = Field(5, ge=0)
    neg_max: int = Field(30, ge=1)
    max_segment_tokens: int = Field(1024, ge=1)
    reflection: list[str] = ["wait", "alternatively", "hold on", "another"]
    verification: list[str] = ["verify", "think again", "recap", "check"]
    affirmation: list[str] = ["yeah", "yes", "final answer", "confident"]
    review_prompt: str = "Let me check whether there are some wrong steps:"


def classify(text: str, p: SpecThinkingParams) -> Literal["affirmation", "reflection", "statement"]:
    low = text.lower()
    pos = sum(low.count(w) for w in p.affirmation)
    neg = sum(low.count(w) for w in p.reflection + p.verification)
    if pos > neg:
        return "affirmation"
    if neg > 0:
        return "reflection"
    return "statement"


def has_verification(text: str, p: SpecThinkingParams) -> bool:
    low = text.lower()
    return any(w in low for w in p.verification)


class SpeculativeThinking(Policy):
    name = "spec-thinking"
    roles = ("small", "large")
    params: SpecThinkingParams

    async def _large_burst(self, session: Session, n: int, kind: str, note: str) -> str:
        g = await session.generate("large", max_tokens=n)
        session.accept("large", g, kind=kind, note=note)
        return g.text

    def _greedy_resample(self, session: Session, probe: Generation) -> Generation | None:
        """What resampling after a statement probe writes under greedy decoding, when the probe shows it.

        The resample continues the same context as the probe with a stop at the
        delimiter, so it is the probe cut after the token that completes the first
        delimiter, if the probe has one within the budget.
        """
        p = self.params
        cut = probe.text.find(p.delimiter)
        if not session.params.greedy or cut < 0:
            return None
        decode = session.models["small"].decode
        n = next(m for m in range(1, len(probe.token_ids) + 1) if p.delimiter in decode(probe.token_ids[:m]))
        if n > min(session.budget_left, p.max_segment_tokens):
            return None
        return Generation(token_ids=probe.token_ids[:n], text=probe.text[:cut], finish_reason="stop",
                          stop_reason=p.delimiter)

    async def run(self, session: Session) -> None:
        p = self.params
        negatives, threshold, n3 = 0, p.neg_threshold, p.n3
        resampled: Generation | None = None  # the next small segment, already known (greedy resample)
        while not session.finished and not session.out_of_budget:
            g = resampled or await session.generate("small", stop=[p.delimiter], max_tokens=p.max_segment_tokens)
            resampled = None
            hit = g.finish_reason == "stop"
            session.accept("small", g, then=p.delimiter if hit else "")
            if session.finished or not hit or session.out_of_budget:
                continue
            if negatives >= threshold:
                session.insert("large", p.review_prompt, note="excessive reflection")
                session.tally(handoffs=1)
                await self._large_burst(session, n3, "review", "review")
                negatives, n3, threshold = 0, min(n3 + p.n3_step, p.n3_max), min(threshold + p.neg_step, p.neg_max)
                continue
            probe = await session.generate("small", max_tokens=p.n1)
            kind = classify(probe.text, p)
            if kind == "statement":  # the small model keeps control and resamples from the delimiter
                session.tally(proposed=1, accepted=1)
                session.reject("small", probe.text, len(probe.token_ids), kind="probe", note="statement: resampled")
                resampled = self._greedy_resample(session, probe)
                continue
            session.reject("small", probe.text, len(probe.token_ids), kind="probe", note=kind)
            session.tally(proposed=1, handoffs=1)
            text = await self._large_burst(session, p.n1, "burst", kind)
            if classify(text, p) == "reflection":
                negatives += 1
            if has_verification(text, p) and not session.finished and p.n2:
                await self._large_burst(session, p.n2, "burst", "verification")
