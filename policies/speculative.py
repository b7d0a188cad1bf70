"""Lossless speculative decoding across the two workers (Leviathan et al.; Chen et al.).

The reference every lossy policy is measured against: its output has exactly the
large model's distribution. Draft token x_i is accepted with probability
min(1, p_i(x)/q_i(x)); at the first rejection a token is drawn from the residual
norm(max(0, p_i - q_i)); when all are accepted a bonus token comes from p after the
draft. p and q are the *sampling* distributions (temperature, top-k, top-p applied
by the same function the hf backend samples with). Under greedy decoding the rule
reduces to "keep draft tokens equal to the large model's argmax", and the output
equals LargeOnly's token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from policies.token_level import DraftVerifyParams, DraftVerifyPolicy
from workers.sampling import sampling_probs

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class SpeculativeParams(DraftVerifyParams):
    type: Literal["speculative"] = "speculative"


def accept_reject(p: torch.Tensor, q: torch.Tensor, draft: list[int], p_next: torch.Tensor | None,
                  rng: torch.Generator) -> tuple[int, int | None]:
    """The lossless rule on probability rows p[i], q[i] (one per draft token)."""
    for i, x in enumerate(draft):
        if torch.rand((), generator=rng) * q[i, x] < p[i, x]:  # u < p/q without dividing by zero
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=rng))
    if p_next is None:
        return len(draft), None
    return len(draft), int(torch.multinomial(p_next, 1, generator=rng))


class SpeculativeDecoding(DraftVerifyPolicy):
    name = "speculative"
    params: SpeculativeParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        sp = session.params
        if sp.greedy:  # keep draft tokens equal to the large model's argmax (read in the worker: no rows cross)
            s = await session.score("large", ids, tokens, sample=session.gen_params())
            for i, x in enumerate(tokens):
                if s.sampled[i] != x:
                    return i, s.sampled[i]
            return len(tokens), None if ended else s.sampled[-1]
        ps = await session.score("large", ids, tokens, full_dists=True, full_next=not ended)
        qs = await session.score("small", ids, tokens, full_dists=True)
        probs = lambda rows: sampling_probs(torch.tensor(rows), sp.temperature, sp.top_k, sp.top_p)  # noqa: E731
        return accept_reject(probs(ps.dists), probs(qs.dists), tokens,
                             None if ended else probs([ps.next_logprobs])[0], session.generator())
