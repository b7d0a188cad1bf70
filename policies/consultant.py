"""Consultant Decoding (Ding et al., 2025): keep draft tokens the large model finds likely.

The small model drafts ``draft_tokens`` tokens; the large model scores them in one
pass. Token i is kept while its negative log-likelihood under the large model,
optionally smoothed as r_i = beta * r_(i-1) + (1 - beta) * nll_i (beta = 0: no
smoothing, r starts at the first token's nll each round), stays at or under
``epsilon`` (default 2.0, i.e. p_large > e^-2 ~ 0.135). At the first miss the large
model's own token is used; when every draft token is kept, the large model's token
for the next position follows (the bonus token, as in speculative decoding). Both
come from the one scoring pass over the draft: its argmax under greedy decoding, a
draw from its sampling distribution otherwise (``Scores.sampled``), so a round is
one large-model call. The draft model's probabilities are not used.

Defaults and sources: epsilon 2.0 (the paper's Chinchilla-fit convergence loss, as
reported by secondary summaries of arXiv 2506.02391). beta: the paper's PDF could
not be read from this machine; a secondary summary (papernotes.org) gives 0.2 for
the EMA-smoothed variant. The default here is 0, the plain rule
-log p_large(x_i) <= epsilon; ``beta: 0.2`` selects the smoothed variant.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        p = self.params
        s = await session.score("large", ids, draft.token_ids, sample=session.gen_params())
        r = None
        for i, lp in enumerate(s.logprobs):
            r = -lp if r is None or p.beta == 0 else p.beta * r + (1 - p.beta) * -lp
            if r > p.epsilon:
                return i, s.sampled[i]
        return len(draft.token_ids), None if draft.finish_reason == "eos" else s.sampled[-1]
