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

The rules here are shared: ``accept_or_resample`` (with ``greedy_match``) is every
lossless level's rule in hierarchical speculative decoding (``policies.levels``),
between any two roles, ``recursive_accept`` the
multi-candidate rule (``policies.multi_candidate``) of which the single-draft test
is the one-candidate case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from policies.token_level import DraftVerifyParams, DraftVerifyPolicy
from workers.protocol import Fusion, joined
from workers.sampling import draw, fused_rows, sampling_probs

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
    return None, int(draw(p, 1, rng))


def accept_reject(p: torch.Tensor, q: torch.Tensor, draft: list[int], p_next: torch.Tensor | None,
                  rng: torch.Generator) -> tuple[int, int | None]:
    """The lossless rule on probability rows p[i], q[i] (one per draft token)."""
    for i, x in enumerate(draft):
        j, token = recursive_accept(p[i], q[i], [x], rng)
        if j is None:
            return i, token
    if p_next is None:
        return len(draft), None
    return len(draft), int(draw(p_next, 1, rng))


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
                  rng: torch.Generator) -> tuple[int, float] | None:
    """A token from the residual norm(max(0, p - q)) by rejection sampling draws from p, with its log p; or None
    if all fail.

    Draw y ~ p is kept with probability (p(y) - q(y))+ / p(y) <= 1: a kept draw has
    exactly the residual's distribution, and only a few numbers per draw cross the
    workers' boundary instead of two vocabulary-sized rows.
    """
    for y, lp, lq in zip(draws, p_logprobs, q_logprobs):
        p, q = math.exp(lp), math.exp(lq)
        if torch.rand((), generator=rng) * p < p - q:
            return y, lp
    return None


def verifier_reads(session: Session) -> dict:
    """What a lossless verification pass asks of the verifier under sampling: p at the draft tokens (with the
    sampling params), ``RESIDUAL_DRAWS`` draws from p per position and after the draft."""
    return {"sample": session.gen_params(), "draws": RESIDUAL_DRAWS}


@dataclass(frozen=True)
class Reread:
    """Where the verifier's distribution at a rejected position is read again when the residual needs more draws.

    Plain verification reads it as a one-row call after the kept tokens (``prefix``; the worker's cache
    holds it). A fused pass (Reflective Verification, ``fuse``) has no one-row equivalent: the same pass
    over ``continuation`` is asked again and its fused row ``row`` read.
    """

    role: str
    prefix: Sequence[int]
    continuation: list[int] = field(default_factory=list)
    row: int = 0
    fuse: Fusion | None = None

    async def draws(self, session: Session, n: int) -> tuple[list[int], list[float]]:
        """``n`` draws from the verifier's sampling distribution at the position, with their log-probabilities."""
        reads: dict[str, Any] = {"fuse": self.fuse} if self.fuse else {}
        s = await session.score(self.role, self.prefix, self.continuation, sample=session.gen_params(), draws=n, **reads)
        return s.draws[self.row], s.draw_logprobs[self.row]

    async def logprobs(self, session: Session) -> list[float]:
        """The position's whole log-distribution (raw, before the sampling params): the residual's last resort."""
        s = await session.score(self.role, self.prefix, self.continuation, full_dists=True, full_next=True)
        rows = torch.tensor([*s.dists, s.next_logprobs])
        return (fused_rows(rows, self.fuse) if self.fuse else rows)[self.row].tolist()


async def accept_or_resample(session: Session, verifier: str, drafter: str, ids: Sequence[int], tokens: list[int],
                             q_logprobs: Sequence[float], ended: bool, ps: Scores, rng: torch.Generator,
                             reread: Callable[[int], Reread] | None = None) -> tuple[int, int | None, float | None]:
    """The lossless rule under sampling on the verifier's pass ``ps`` (``verifier_reads``) over ``tokens``, drawn
    with ``q_logprobs``: (tokens kept, the next token, its log-probability under the verifier).

    The next token is the residual's at the first rejection (``residual_at``; ``reread(i)`` says where the
    verifier's row i is read again, by default the one-row call after the kept tokens), or after a fully kept
    draft one of p's draws there (the bonus; None when the draft ``ended`` with EOS).
    """
    i = first_rejection(ps.sample_logprobs, q_logprobs, rng)
    if i < len(tokens):
        prefix = joined(ids, tokens[:i])
        again = reread(i) if reread else Reread(verifier, prefix)
        return i, *await residual_at(session, again, drafter, prefix, ps.draws[i], ps.draw_logprobs[i], rng)
    return (i, None, None) if ended else (i, ps.draws[i][0], ps.draw_logprobs[i][0])


async def residual_at(session: Session, verifier: Reread, drafter: str, prefix: Sequence[int], draws: list[int],
                      draw_logprobs: list[float], rng: torch.Generator) -> tuple[int, float]:
    """The residual token after ``prefix`` (and its log p) from the verifier's ``draws`` there.

    The drafter is asked for q at the draws only (a one-row call: its cache holds the prefix). When all are
    turned down, the verifier is asked for ``RESIDUAL_GROWTH`` times more, up to ``RESIDUAL_ASKS`` asks in all;
    then, as a last resort, the residual is read from the two rows.
    """
    n = RESIDUAL_DRAWS
    for ask in range(RESIDUAL_ASKS):
        if ask:
            n *= RESIDUAL_GROWTH
            draws, draw_logprobs = await verifier.draws(session, n)
        qs = await session.score(drafter, prefix, [], sample=session.gen_params(), candidates=[draws])
        if (picked := residual_pick(draws, draw_logprobs, qs.candidate_logprobs[0], rng)) is not None:
            return picked
    qs = await session.score(drafter, prefix, [], full_next=True)
    p, q = row_probs([await verifier.logprobs(session), qs.next_logprobs], session.params)
    token = int(draw(residual_probs(p, q), 1, rng))
    return token, math.log(float(p[token]))


class SpeculativeDecoding(DraftVerifyPolicy):
    name = "speculative"
    params: SpeculativeParams

    def draft_reads(self, session: Session) -> dict[str, Any]:
        """Under sampling the draft carries q at each of its tokens, as drawn (``GenParams.sample_logprobs``)."""
        return {"sample_logprobs": not session.params.greedy}

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        """Greedy: the large model's argmax, read in the worker. Sampling: p and q at a few tokens each.

        The draft came with q at its tokens; the large model's pass returns p there,
        ``RESIDUAL_DRAWS`` draws from p per position and after the draft (the first
        there is the bonus token). Only at a rejection is the small model asked again, for q
        at that position's draws (a one-row call: its cache holds the prefix). No row
        of either distribution crosses the boundary: O(draft length) numbers a round.
        """
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        if session.params.greedy:
            s = await session.score("large", ids, tokens, sample=session.gen_params())
            return greedy_match(tokens, s.sampled, ended)
        ps = await session.score("large", ids, tokens, **verifier_reads(session))
        q = draft.sample_logprobs
        if q is None:  # drafted without them (a subclass's own draft): read q at its tokens
            q = (await session.score("small", ids, tokens, sample=session.gen_params())).sample_logprobs
        n, token, _ = await accept_or_resample(session, "large", "small", ids, tokens, q, ended, ps, session.generator())
        return n, token
