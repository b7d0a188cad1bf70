"""Speculative Verification (Kim et al.; arXiv 2509.24328): how much of a draft to verify.

The small model drafts ``draft_tokens`` tokens as usual; before the large model
checks them, a predicted acceptance a_i for each draft token picks the
verification length gamma that maximises goodput, the expected tokens a round
yields per unit of verification cost:

    goodput(gamma) = (1 + sum_{i<=gamma} prod_{j<=i} a_j) / (1 + verify_cost * gamma)

(the leading 1: every round ends with one large-model token, replacement or bonus;
``verify_cost``: the cost of verifying one more token relative to a verification
pass's fixed cost). The numerator's increments shrink and the denominator is linear,
so goodput is unimodal in gamma and an incremental search from gamma = 1 finds its
maximum, as the paper does. Only the first gamma tokens are verified, with the
lossless rule of ``policies.speculative`` (so the output keeps the large model's
distribution: the length is all that changes); the draft tokens after them are
dropped unverified and do not count as proposed.

Where the a_i come from (``companion``):
- ``mid``: the paper's setting, a companion model about the size of the draft
  (the config's ``mid`` role, sharing the vocabulary) scores the draft in one pass.
  Per token, S = sum_v min(P_d(v), P_c(v)) (their overlap) and
  A = min(1, P_c(t)/P_d(t)) (the companion accepting the draft token t as a target
  would). The paper's mapping from (S, A) to P(accept) is not public; here
  a = ``mix`` * A + (1 - ``mix``) * S. S is summed over the tokens in both models'
  top ``top_k`` (a lower bound of the full sum; the draft's top-k come with its
  generation, the companion's with its pass), so no vocabulary-sized row crosses
  the protocol.
- ``none`` (the default with two models): no third model is there to compare
  the draft with -- the small model as its own companion would give S = A = 1 -- so
  the draft's own confidence stands in, a = the draft's top-1 probability at the
  position (the signal Kangaroo's and BiLD's draft-side stopping rules use).

Losslessness needs care under sampling: whether token i is verified may depend on
the tokens before it but not on token i itself, or the verified drafts are no longer
distributed as the draft model's and the accept/reject test is biased (choosing
gamma from P_d(t_i), the draft's probability of its own token, gave a chi-square of
48.6 on 12 dof against the large model's two-token distribution in this module's
unit test, p ~ 1e-6). Every signal above is a function of the position's distributions except
A, which reads the token; under sampling A is therefore replaced by its expectation
over the draft's own token, E_t[min(1, P_c(t)/P_d(t))] = S, so a = S there. Under
greedy decoding the token is its position's argmax and A is used as it is.

Probabilities are the models' raw (temperature-1) distributions as the workers
report them. ``verify_cost: 0`` verifies every draft token (plain speculative
decoding); a large one verifies a single token per round. The verification length
chosen each round goes into the trace as a rejected ``tokens`` segment for the
unverified tail (``note`` gives gamma and the predicted acceptances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from policies.speculative import SpeculativeDecoding
from policies.token_level import SerialDraftParams, cut, reject_draft, top_probability

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class SpecVerificationParams(SerialDraftParams):
    type: Literal["spec-verification"] = "spec-verification"
    draft_tokens: int = Field(8, ge=1, le=64, description="tokens drafted per round (the most that are verified)")
    companion: Literal["none", "mid"] = Field("none", description="mid: a companion model gives S and A")
    mix: float = Field(0.5, ge=0, le=1, description="a = mix * A + (1 - mix) * S (with a companion)")
    verify_cost: float = Field(0.1, ge=0, description="cost of one more verified token / fixed cost of a pass")
    top_k: int = Field(20, ge=1, description="top tokens per position summed for S")


def overlap_mass(p: dict[int, float], q: dict[int, float]) -> float:
    """sum_v min(p(v), q(v)) over the tokens both (partial) distributions list."""
    return sum(min(p[v], q[v]) for v in p.keys() & q.keys())


def verification_length(accept: Sequence[float], verify_cost: float) -> int:
    """The gamma in 1..len(accept) maximising goodput (see the module docstring); 0 for an empty draft."""
    if not accept:
        return 0
    run, expected, best = 1.0, [], 0.0
    for a in accept:
        run *= a
        best += run
        expected.append(best)
    goodput = lambda g: (1 + expected[g - 1]) / (1 + verify_cost * g)  # noqa: E731
    gamma = 1
    while gamma < len(accept) and goodput(gamma + 1) > goodput(gamma):
        gamma += 1
    return gamma


class SpeculativeVerification(SpeculativeDecoding):
    name = "spec-verification"
    params: SpecVerificationParams  # type: ignore[assignment]

    def __init__(self, params: SpecVerificationParams):
        super().__init__(params)
        self.roles = ("small", "mid", "large") if params.companion == "mid" else ("small", "large")

    async def predicted_acceptance(self, session: Session, draft: Generation) -> list[float]:
        """a_i per draft token (see the module docstring)."""
        p = self.params
        confidence = [top_probability(lp) for lp in draft.logprobs or []]
        if p.companion == "none":
            return confidence
        c = await session.score("mid", session.log("mid"), draft.token_ids, top_k=p.top_k)
        greedy = session.params.greedy
        out = []
        for lp, lc, top_c in zip(draft.logprobs, c.logprobs, c.top):
            pd = {t: math.exp(v) for t, v in {**lp.top, lp.token_id: lp.logprob}.items()}
            pc = {t: math.exp(v) for t, v in {**top_c, lp.token_id: lc}.items()}
            s = overlap_mass(pd, pc)
            a = min(1.0, pc[lp.token_id] / pd[lp.token_id]) if greedy and pd[lp.token_id] > 0 else s
            out.append(p.mix * a + (1 - p.mix) * s)
        return out

    async def draft(self, session: Session, ids: Sequence[int], length: int) -> Generation:
        p = self.params
        g = await session.generate("small", ids=ids, max_tokens=min(length, session.budget_left),
                                   logprobs=p.top_k if p.companion == "mid" else 1,
                                   sample_logprobs=not session.params.greedy)
        accept = await self.predicted_acceptance(session, g)
        gamma = verification_length(accept, p.verify_cost)
        if gamma < len(g.token_ids):
            reject_draft(session, g.token_ids[gamma:],
                         f"unverified: gamma {gamma} of {len(g.token_ids)}; a = {[round(a, 3) for a in accept]}")
        return cut(session, g, gamma)
