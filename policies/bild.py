"""BiLD, the Big Little Decoder (Kim et al., NeurIPS 2023), across two workers.

The rules as the reference code (kssteven418/BigLittleDecoder, ``T5BiLDModel``)
has them, in this package's draft-and-verify loop:

- **Fallback.** The small model decodes; as soon as its top probability at a
  position falls below ``fallback_threshold`` (code default 0.6), that token is
  discarded and control passes to the large model, which writes the token at that
  position. The small model writes at most ``draft_tokens`` tokens in a row
  (``num_small_iters``, default 10) before control passes anyway.
- **Rollback.** The large model runs over the small model's window in one pass
  (one ``score`` call). At the first position whose loss -log p_large(small token)
  exceeds ``rollback_threshold`` (code default 5.0) -- unless the large model's
  argmax is that very token -- the window is cut there and the large model's token
  replaces it. Without a rollback the large model's token after the window follows
  (the fallback token, or the token after ``draft_tokens`` small ones).
- Generation starts with the large model (``large_first``, as in the code).

So one round is one small ``generate`` (asked for the top-1 logprob of each token,
ending in the small model's worker at the token it falls back on: ``GenParams.stop_below``)
and one large ``score``: the rollback check and the large token come from the same
pass (``Scores.sampled``), and no distribution crosses the protocol.

Beyond the reference (greedy-only, T5): under sampling the small model samples, its
confidence is still the top-1 probability of its raw distribution (temperature 1, as
the logprobs are reported), and the large model's replacement is a draw from its
sampling distribution; its argmax, for the "skip if equal" check, comes from the
pass's top-1. Not lossless: a kept small token need only be plausible to the large
model. Decisions go into the trace: discarded fallback tokens and rolled-back
windows as rejected ``tokens`` segments with the rule's reading in ``note``;
rollbacks count as handoffs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.token_level import DraftVerifyPolicy, SerialDraftParams, cut, reject_draft, top_probability
from workers.protocol import Generation

if TYPE_CHECKING:
    from orchestrator.session import Session


class BiLDParams(SerialDraftParams):
    type: Literal["bild"] = "bild"
    draft_tokens: int = Field(10, ge=1, le=64, description="most small tokens in a row (num_small_iters)")
    fallback_threshold: float = Field(0.6, ge=0, le=1, description="small top-1 probability below this: fall back")
    rollback_threshold: float = Field(5.0, ge=0, description="large NLL of a small token above this: roll back")
    large_first: bool = Field(True, description="the large model writes the first token, as in the reference")


def fallback_point(probs: Sequence[float], threshold: float) -> int:
    """How many small tokens stand: those before the first whose top probability is under ``threshold``."""
    return next((i for i, p in enumerate(probs) if p < threshold), len(probs))


def rollback_point(nll: Sequence[float], argmax: Sequence[int], tokens: Sequence[int], threshold: float) -> int | None:
    """The first position the large model rolls back (loss over ``threshold`` and not its own argmax), or None."""
    return next((i for i, (d, a, t) in enumerate(zip(nll, argmax, tokens)) if d > threshold and a != t), None)


class BiLD(DraftVerifyPolicy):
    name = "bild"
    params: BiLDParams

    async def draft(self, session: Session, ids: Sequence[int], length: int) -> Generation:
        p = self.params
        if p.large_first and session.accepted_tokens == 0:  # the large model opens: an empty window
            return Generation(token_ids=[], text="", finish_reason="length")
        # the small model stops in its worker at the token it falls back on: nothing after it is drafted
        g = await session.generate("small", ids=ids, max_tokens=min(length, session.budget_left), logprobs=1,
                                   stop_below=p.fallback_threshold or None)
        probs = [top_probability(lp) for lp in g.logprobs or []]
        n = fallback_point(probs, p.fallback_threshold)
        if n < len(g.token_ids):
            reject_draft(session, g.token_ids[n:n + 1],
                         f"fallback: small top-1 p {probs[n]:.3f} < {p.fallback_threshold}")
        return cut(session, g, n)

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        p = self.params
        tokens = draft.token_ids
        sample = session.gen_params()
        s = await session.score("large", ids, tokens, sample=sample, top_k=0 if sample.greedy else 1)
        argmax = s.sampled if sample.greedy else [max(t, key=t.get) for t in s.top or []]
        j = rollback_point([-lp for lp in s.logprobs], argmax, tokens, p.rollback_threshold)
        if j is not None:
            reject_draft(session, tokens[j:], f"rollback: large nll {-s.logprobs[j]:.3f} > {p.rollback_threshold}")
            return j, s.sampled[j]
        return len(tokens), None if draft.finish_reason == "eos" else s.sampled[len(tokens)]
