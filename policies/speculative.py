"""Lossless speculative decoding across the two workers (Leviathan et al.; Chen et al.).

The reference every lossy policy is measured against: its output has exactly the
large model's distribution. Draft token x_i is accepted with probability
min(1, p_i(x)/q_i(x)); at the first rejection a token is drawn from the residual
norm(max(0, p_i - q_i)); when all are accepted a bonus token comes from p after the
draft. p and q are the *sampling* distributions (temperature, top-k, top-p applied
by the same function the hf backend samples with). Under greedy decoding the rule
reduces to "keep draft tokens equal to the large model's argmax", and the output
equals LargeOnly's token for token.

Between processes the rule moves a few numbers per draft token, never a row:
q at the draft tokens (returned with the draft), p there and a handful of draws
from p per position (the large model's pass), and, at a rejection, q at that
position's draws; the residual is drawn by rejection sampling from p's draws
(``residual_pick``), so verification crosses the worker boundary in O(draft
length) numbers however large the vocabulary.

The rules here are shared: ``lossless`` is every level's rule in hierarchical
speculative decoding (``policies.hierarchical``), ``recursive_accept`` the
multi-candidate rule (``policies.multi_candidate``) of which the single-draft test
is the one-candidate case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from policies.token_level import DraftVerifyParams, DraftVerifyPolicy
from workers.protocol import joined
from workers.sampling import sampling_probs

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation, GenParams, Scores


class SpeculativeParams(DraftVerifyParams):
    type: Literal["speculative"] = "speculative"


def residual_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The residual norm(max(0, p - q)) a rejected token is replaced from (p itself where p <= q everywhere)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return residual / total if total > 0 else p


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
        p = residual_probs(p, q)
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


#: Draws from p a verification pass returns per position, and how the residual's later asks grow: at a
#: rejection a residual token is found among the draws with probability 1 - (1 - TV(p, q))^n, so a
#: further ask is needed at under 1/(n e) of positions, with n the draws so far.
RESIDUAL_DRAWS = 16
RESIDUAL_GROWTH = 4
#: Asks for draws at one position before the residual is read from the two rows (exact, vocabulary-sized):
#: reached at about 1 in 4,000 positions at most (16 + 64 + 256 + 1024 draws all turned down).
RESIDUAL_ASKS = 4


def first_rejection(p_logprobs: Sequence[float], q_logprobs: Sequence[float], rng: torch.Generator) -> int:
    """The first draft position whose token the min(1, p/q) test turns down (the draft's length if none)."""
    for i, (lp, lq) in enumerate(zip(p_logprobs, q_logprobs)):
        if not torch.rand((), generator=rng) * math.exp(lq) < math.exp(lp):  # u < p/q without dividing
            return i
    return len(p_logprobs)


def residual_pick(draws: Sequence[int], p_logprobs: Sequence[float], q_logprobs: Sequence[float],
                  rng: torch.Generator) -> int | None:
    """A token from the residual norm(max(0, p - q)) by rejection sampling draws from p, or None if all fail.

    Draw y ~ p is kept with probability (p(y) - q(y))+ / p(y) <= 1: a kept draw has
    exactly the residual's distribution, and only a few numbers per draw cross the
    workers' boundary instead of two vocabulary-sized rows.
    """
    for y, lp, lq in zip(draws, p_logprobs, q_logprobs):
        p, q = math.exp(lp), math.exp(lq)
        if torch.rand((), generator=rng) * p < p - q:
            return y
    return None


class SpeculativeDecoding(DraftVerifyPolicy):
    name = "speculative"
    params: SpeculativeParams

    async def draft(self, session: Session, ids: Sequence[int]) -> Generation:
        """Under sampling the draft carries q at each of its tokens, as drawn (``GenParams.sample_logprobs``)."""
        return await session.generate("small", ids=ids, max_tokens=min(self.params.draft_tokens, session.budget_left),
                                      sample_logprobs=not session.params.greedy)

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        """Greedy: the large model's argmax, read in the worker. Sampling: p and q at a few tokens each.

        The draft came with q at its tokens; the large model's pass returns p there,
        ``RESIDUAL_DRAWS`` draws from p per position and its own draw after the draft
        (the bonus token). Only at a rejection is the small model asked again, for q
        at that position's draws (a one-row call: its cache holds the prefix). No row
        of either distribution crosses the boundary: O(draft length) numbers a round.
        """
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        if session.params.greedy:
            s = await session.score("large", ids, tokens, sample=session.gen_params())
            return greedy_match(tokens, s.sampled, ended)
        ps = await session.score("large", ids, tokens, sample=session.gen_params(), draws=RESIDUAL_DRAWS)
        q = draft.sample_logprobs
        if q is None:  # drafted without them (a subclass's own draft): read q at its tokens
            q = (await session.score("small", ids, tokens, sample=session.gen_params())).sample_logprobs
        rng = session.generator()
        i = first_rejection(ps.sample_logprobs, q, rng)
        if i == len(tokens):
            return i, None if ended else ps.sampled[i]
        return i, await self.residual_at(session, ids, tokens, i, ps, rng)

    async def residual_at(self, session: Session, ids: Sequence[int], tokens: list[int], i: int, ps: Scores,
                          rng: torch.Generator) -> int:
        """The residual token at draft position ``i`` (rejected), from the verification pass ``ps``'s draws there:
        the small model is asked for q at them only (a one-row call: its cache holds the prefix)."""
        prefix = joined(ids, tokens[:i])
        qs = await session.score("small", prefix, [], sample=session.gen_params(), candidates=[ps.draws[i]])
        token = residual_pick(ps.draws[i], ps.draw_logprobs[i], qs.candidate_logprobs[0], rng)
        if token is None:
            token = await self.residual(session, prefix, RESIDUAL_DRAWS * RESIDUAL_GROWTH)
        return token

    async def residual(self, session: Session, prefix: Sequence[int], draws: int) -> int:
        """The residual token after ``prefix`` when the verification pass's draws all failed: ask for more."""
        for _ in range(RESIDUAL_ASKS - 1):
            ps = await session.score("large", prefix, [], sample=session.gen_params(), draws=draws)
            qs = await session.score("small", prefix, [], sample=session.gen_params(), candidates=ps.draws)
            token = residual_pick(ps.draws[0], ps.draw_logprobs[0], qs.candidate_logprobs[0], session.generator())
            if token is not None:
                return token
            draws *= RESIDUAL_GROWTH
        ps = await session.score("large", prefix, [], full_next=True)
        qs = await session.score("small", prefix, [], full_next=True)
        p, q = row_probs([ps.next_logprobs, qs.next_logprobs], session.params)
        return int(torch.multinomial(residual_probs(p, q), 1, generator=session.generator()))
