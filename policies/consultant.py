"""Consultant Decoding (Ding et al., 2025): keep draft tokens the large model finds likely.

The small model drafts ``draft_tokens`` tokens; the large model scores them in one
pass. Token i is kept while its negative log-likelihood under the large model,
optionally smoothed as r_i = beta * r_(i-1) + (1 - beta) * nll_i (beta = 0: no
smoothing, r starts at the first token's nll each round), stays at or under
``epsilon`` (default 2.0, i.e. p_large > e^-2 ~ 0.135). At the first miss the large
model's own token is used: its argmax under greedy decoding (read from the same
scoring pass), a sample from it otherwise (one extra one-position scoring call, its
prefix served from cache). The draft model's probabilities are not used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.token_level import DraftVerifyParams, DraftVerifyPolicy

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class ConsultantParams(DraftVerifyParams):
    type: Literal["consultant"] = "consultant"
    epsilon: float = Field(2.0, gt=0)
    beta: float = Field(0.0, ge=0, lt=1)


class ConsultantDecoding(DraftVerifyPolicy):
    name = "consultant"
    params: ConsultantParams

    async def verify(self, session: Session, ids: list[int], draft: Generation) -> tuple[int, int | None]:
        p = self.params
        greedy = session.params.greedy
        s = await session.score("large", ids, draft.token_ids, top_k=1 if greedy else 0)
        r = None
        for i, lp in enumerate(s.logprobs):
            r = -lp if r is None or p.beta == 0 else p.beta * r + (1 - p.beta) * -lp
            if r > p.epsilon:
                if greedy:
                    return i, max(s.top[i], key=s.top[i].get)
                return i, await self.sample_large(session, ids + draft.token_ids[:i])
        return len(draft.token_ids), None
