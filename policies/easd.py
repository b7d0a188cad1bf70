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
  Under greedy decoding the workers compute them (``Scores.entropies``, top-N from
  ``Scores.top``: no vocabulary-sized rows cross the protocol); under sampling the
  full rows are needed for the accept/reject test anyway and the gate reads them.

Gate rejections go into the trace as rejected ``tokens`` segments (with both
entropies and the overlap in ``note``) and count as handoffs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from policies.speculative import accept_reject
from policies.token_level import DraftVerifyParams, DraftVerifyPolicy, reject_draft
from workers.sampling import sampling_probs

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


class EntropyAwareSD(DraftVerifyPolicy):
    name = "easd"
    params: EASDParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        p, sp = self.params, session.params
        if sp.greedy:
            ls = await session.score("large", ids, tokens, top_k=p.top_n, entropies=True, sample=session.gen_params())
            qs = await session.score("small", ids, tokens, top_k=p.top_n, entropies=True)
            for i, x in enumerate(tokens):
                why = gate(p, qs.entropies[i], ls.entropies[i], list(qs.top[i]), list(ls.top[i]))
                if why is not None:
                    reject_draft(session, [x], why)
                    return i, max((t for t in ls.top[i] if t != x), key=ls.top[i].get)
                if ls.sampled[i] != x:
                    return i, ls.sampled[i]
            return len(tokens), None if ended else ls.sampled[-1]
        ps = await session.score("large", ids, tokens, full_dists=True, full_next=not ended)
        qs = await session.score("small", ids, tokens, full_dists=True)
        lp, lq = torch.tensor(ps.dists), torch.tensor(qs.dists)
        entropy = lambda rows: -(rows.exp() * rows).sum(-1)  # noqa: E731  (raw log-softmax rows)
        hp, hq = entropy(lp), entropy(lq)
        top_p, top_q = lp.topk(p.top_n, -1).indices, lq.topk(p.top_n, -1).indices
        fired = ((i, why) for i in range(len(tokens))
                 if (why := gate(p, float(hq[i]), float(hp[i]), top_q[i].tolist(), top_p[i].tolist())) is not None)
        g, why = next(fired, (len(tokens), None))
        probs = lambda rows: sampling_probs(rows, sp.temperature, sp.top_k, sp.top_p)  # noqa: E731
        pp, pq = probs(lp), probs(lq)
        rng = session.generator()
        p_next = None if ended or g < len(tokens) else probs(torch.tensor([ps.next_logprobs]))[0]
        n, nxt = accept_reject(pp[:g], pq[:g], tokens[:g], p_next, rng)
        if n == g and why is not None:  # the usual test kept everything before the gate: re-sample there
            reject_draft(session, [tokens[g]], why)
            return g, int(torch.multinomial(without(pp[g], tokens[g]), 1, generator=rng))
        return n, nxt
