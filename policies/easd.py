"""EASD, Entropy-Aware Speculative Decoding (Su, Zhang, He; arXiv 2512.23765): lossy on purpose.

Speculative decoding with one more rejection: at a draft position where **both**
models are uncertain -- the entropy of the small model's and of the large model's
next-token distribution each at or above ``entropy_threshold`` -- and their top-N
predictions overlap (the share of the small model's top ``top_n`` tokens that are
also in the large model's, compared with ``overlap_threshold``), the drafted token
is rejected whatever the usual test says, and the large model re-samples *without*
it: from its sampling distribution with the draft token's probability set to 0 and
renormalised (under greedy decoding: its best token other than the draft). Elsewhere
the lossless rule of ``policies.speculative`` applies unchanged (greedy: argmax
match; sampling: accept with min(1, p/q), residual at the first rejection, a bonus
token after a fully accepted draft). The aim is accuracy, not fidelity: where both
models hesitate, the draft's choice is not simply waved through.

What the sources fix and what is chosen here (``algorithms-seeds.md`` section 1):
- The rule (both entropies high and top-N overlap, then reject and let the target
  re-sample excluding the draft token) is from the abstract and the ICLR reviews.
  That the gate is checked *before* the standard test at each position is this
  module's reading (a reviewer asks; the paper's Eq. (1)/(4)/(5) were not read).
- The overlap direction: the abstract says "overlap substantially", one reviewer
  "not overlapped well". ``overlap: high`` (default, the abstract) fires when the
  overlap is >= the threshold, ``overlap: low`` when it is below it.
- Values: the paper's entropy threshold is a percentile computed on LIMO, its N and
  overlap threshold are not public. Defaults here: N = 5, overlap 0.6, entropy 1.0
  nats -- placeholders to be set per model pair (the arith config sets its own).
- Entropies are over the full vocabulary of each model's raw (temperature-1)
  distribution, so the gate reads the same under greedy decoding and sampling.
  The workers compute them (``Scores.entropies``, top-N from ``Scores.top``), and
  under sampling the usual test reads p and q at a few tokens as
  ``policies.speculative`` does; the re-sample without the draft token is the
  first of the large model's draws at that position that differs from it (a draw
  from p conditioned on not being the draft token), so no vocabulary-sized row
  crosses the protocol unless every draw there was the draft token (probability
  p(x)^16 at a position the gate found uncertain), when p's row is read once.

Gate rejections go into the trace as rejected ``tokens`` segments (with both
entropies and the overlap in ``note``) and count as handoffs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from policies.speculative import (
    Reread, SpeculativeDecoding, first_rejection, residual_at, row_probs, verifier_reads,
)
from policies.token_level import DraftVerifyParams, reject_draft
from workers.protocol import joined
from workers.sampling import draw

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class EASDParams(DraftVerifyParams):
    type: Literal["easd"] = "easd"
    entropy_threshold: float = Field(1.0, ge=0, description="nats; both models at or above it count as uncertain")
    top_n: int = Field(5, ge=2, description="size of each model's top set compared for overlap")
    overlap_threshold: float = Field(0.6, ge=0, le=1, description="share of the small top-N in the large top-N")
    overlap: Literal["high", "low"] = Field("high", description="fire on overlap >= threshold (high) or < it (low)")


def overlap(small_top: Sequence[int], large_top: Sequence[int]) -> float:
    """The share of the small model's top tokens that are among the large model's."""
    return len(set(small_top) & set(large_top)) / max(1, len(small_top))


def gate(p: EASDParams, h_small: float, h_large: float, small_top: Sequence[int],
         large_top: Sequence[int]) -> str | None:
    """Why the entropy gate rejects a draft token here (a trace note), or None when it lets the usual test decide."""
    if h_small < p.entropy_threshold or h_large < p.entropy_threshold:
        return None
    o = overlap(small_top, large_top)
    if (o >= p.overlap_threshold) != (p.overlap == "high"):
        return None
    return f"entropy gate: H small {h_small:.3f}, H large {h_large:.3f} >= {p.entropy_threshold}; overlap {o:.2f}"


def without(probs: torch.Tensor, token: int) -> torch.Tensor:
    """``probs`` with ``token`` removed and renormalised (itself when nothing else has mass)."""
    rest = probs.clone()
    rest[token] = 0
    total = rest.sum()
    return rest / total if total > 0 else probs


class EntropyAwareSD(SpeculativeDecoding):
    """The lossless rule's draft and reads (``SpeculativeDecoding``) with the entropy gate in front of its test."""

    name = "easd"
    params: EASDParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        p, greedy = self.params, session.params.greedy
        reads = {"sample": session.gen_params()} if greedy else verifier_reads(session)
        ls = await session.score("large", ids, tokens, top_k=p.top_n, entropies=True, **reads)
        qs = await session.score("small", ids, tokens, top_k=p.top_n, entropies=True)
        fired = ((i, why) for i in range(len(tokens))
                 if (why := gate(p, qs.entropies[i], ls.entropies[i], list(qs.top[i]), list(ls.top[i]))) is not None)
        g, why = next(fired, (len(tokens), None))
        rng = session.generator()
        if greedy:
            n = next((i for i in range(g) if ls.sampled[i] != tokens[i]), g)
        else:
            n = first_rejection(ls.sample_logprobs[:g], draft.sample_logprobs[:g], rng)
        if n < g:  # the usual test turned a token down before the gate
            if greedy:
                return n, ls.sampled[n]
            prefix = joined(ids, tokens[:n])
            token, _ = await residual_at(session, Reread("large", prefix), "small", prefix, ls.draws[n],
                                         ls.draw_logprobs[n], rng)
            return n, token
        if why is None:
            return g, None if ended else ls.sampled[g]
        x = tokens[g]
        reject_draft(session, [x], why)
        if greedy:
            return g, max((t for t in ls.top[g] if t != x), key=ls.top[g].get)
        return g, await self.without_draft(session, joined(ids, tokens[:g]), x, ls.draws[g], rng)

    async def without_draft(self, session: Session, prefix: Sequence[int], x: int, draws: list[int],
                            rng: torch.Generator) -> int:
        """A token from p after ``prefix`` conditioned on not being ``x``: the first of ``draws`` (from p) that is
        not ``x``, else (every draw was ``x``) drawn from p's row without it."""
        if (y := next((y for y in draws if y != x), None)) is not None:
            return y
        row = (await session.score("large", prefix, [], full_next=True)).next_logprobs
        return int(draw(without(row_probs([row], session.params)[0], x), 1, rng))
