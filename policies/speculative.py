"""Lossless speculative decoding across the two workers (Leviathan et al.; Chen et al.).

The reference every lossy policy is measured against: its output has exactly the
large model's distribution. Draft token x_i is accepted with probability
min(1, p_i(x)/q_i(x)); at the first rejection a token is drawn from the residual
norm(max(0, p_i - q_i)); when all are accepted a bonus token comes from p after the
draft. p and q are the *sampling* distributions (temperature, top-k, top-p applied
by the same function the hf backend samples with). Under greedy decoding the rule
reduces to "keep draft tokens equal to the large model's argmax", and the output
equals LargeOnly's token for token.

The rules here are shared: ``lossless`` is every level's rule in hierarchical
speculative decoding (``policies.hierarchical``), ``recursive_accept`` the
multi-candidate rule (``policies.multi_candidate``) of which the single-draft test
is the one-candidate case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from policies.token_level import DraftVerifyParams, DraftVerifyPolicy
from workers.sampling import sampling_probs

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation, GenParams, Scores


class SpeculativeParams(DraftVerifyParams):
    type: Literal["speculative"] = "speculative"


def recursive_accept(p: torch.Tensor, q: torch.Tensor, candidates: Sequence[int], rng: torch.Generator,
                     replacement: bool = True) -> tuple[int | None, int]:
    """The lossless rule at one position for candidates drawn from q: (index accepted or None, the token).

    Candidate x_j is accepted with probability min(1, p(x)/q(x)); after a rejection
    p becomes the residual norm(max(0, p - q)) and, when the candidates were drawn
    without replacement, q loses x_j and is renormalised (the residual uses the q
    before that). When all are rejected the token is drawn from the last residual.
    One candidate is the single-draft rule; several are MCSD's (NJUNLP/MCSD
    ``strategies.py`` with and without replacement) and RSD's recursive rejection.
    """
    for j, x in enumerate(candidates):
        if torch.rand((), generator=rng) * q[x] < p[x]:  # u < p/q without dividing by zero
            return j, x
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        p = residual / total if total > 0 else p
        if not replacement:
            q = q.clone()
            q[x] = 0
            q = q / q.sum() if q.sum() > 0 else q
    return None, int(torch.multinomial(p, 1, generator=rng))


def accept_reject(p: torch.Tensor, q: torch.Tensor, draft: list[int], p_next: torch.Tensor | None,
                  rng: torch.Generator) -> tuple[int, int | None]:
    """The lossless rule on probability rows p[i], q[i] (one per draft token)."""
    for i, x in enumerate(draft):
        j, token = recursive_accept(p[i], q[i], [x], rng)
        if j is None:
            return i, token
    if p_next is None:
        return len(draft), None
    return len(draft), int(torch.multinomial(p_next, 1, generator=rng))


def greedy_match(draft: Sequence[int], argmax: Sequence[int], ended: bool) -> tuple[int, int | None]:
    """The lossless rule under greedy decoding: keep draft tokens equal to the verifier's argmax.

    ``argmax``: the verifier's token at each draft position and after the last
    (``Scores.sampled`` under greedy params); ``ended``: the draft ends with EOS, so
    no token follows a fully kept draft.
    """
    for i, x in enumerate(draft):
        if argmax[i] != x:
            return i, argmax[i]
    return len(draft), None if ended else argmax[len(draft)]


def row_probs(rows: list[list[float]], params: GenParams) -> torch.Tensor:
    """The sampling distributions (temperature, top-k, top-p of ``params``) of rows a score call returns."""
    return sampling_probs(torch.tensor(rows), params.temperature, params.top_k, params.top_p)


def lossless(draft: list[int], ended: bool, p: Scores, q_dists: list[list[float]] | None, params: GenParams,
             rng: torch.Generator) -> tuple[int, int | None]:
    """The lossless rule on a verifier's pass ``p`` over ``draft`` (drawn from the rows ``q_dists``).

    Greedy: ``greedy_match`` on the pass's argmax (``p.sampled``; no rows needed).
    Sampling: ``accept_reject`` on the sampling distributions of ``p.dists`` (and
    ``p.next_logprobs`` for the bonus token unless the draft ``ended`` with EOS) and q.
    """
    if params.greedy:
        return greedy_match(draft, p.sampled, ended)
    p_next = None if ended else row_probs([p.next_logprobs], params)[0]
    return accept_reject(row_probs(p.dists, params), row_probs(q_dists, params), draft, p_next, rng)


class SpeculativeDecoding(DraftVerifyPolicy):
    name = "speculative"
    params: SpeculativeParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        sp = session.params
        if sp.greedy:  # keep draft tokens equal to the large model's argmax (read in the worker: no rows cross)
            s = await session.score("large", ids, tokens, sample=session.gen_params())
            return lossless(tokens, ended, s, None, sp, session.generator())
        ps = await session.score("large", ids, tokens, full_dists=True, full_next=not ended)
        qs = await session.score("small", ids, tokens, full_dists=True)
        return lossless(tokens, ended, ps, qs.dists, sp, session.generator())
