"""PyramidSD (Byun et al., arXiv 2510.12966): draft, qualifier and target with fuzzy acceptance.

Three models of one family and one vocabulary: the draft (``small``, M_D), the
qualifier (``mid``, M_Q) and the target (``large``, M_T). They form a chain
(``policies.levels``). The draft writes ``draft_tokens`` (l_D) tokens a call. The
qualifier verifies them and holds ``qualifier_tokens`` (l_Q) before the target
verifies its block. This is the structure of the paper's throughput model,
V_PSD = b_TQ (l_Q + 1) / (l_Q / V_QD + 1 / V_T). A draft token reaches the text iff
Div(P_Q, P_D) <= tau_Q at the qualifier and Div(P_T, P_Q) <= tau_T at the target.

The fuzzy test is FSD's, as its official code has it (maxholsman/fsd ``fsd_utils.py``):

- it is deterministic (no uniform draw);
- it is computed on the full *raw* distributions, before temperature, top-k and top-p;
- it keeps the leading positions that pass;
- the first failure is replaced by a draw from the verifier's *sampling* distribution
  at that position (not the residual), and after a fully kept block a bonus token is
  drawn from it. Both come from the verifier's own pass (``Scores.sampled``): its
  argmax under greedy decoding.

Variants (``variant``), after a secondary note on the paper (its text was not read):

- ``F`` (PSD_F): the fuzzy test at both stages.
- ``A`` (PSD_A): "assisted decoding" at the qualifier stage, i.e. the lossless
  speculative-sampling rule between draft and qualifier (what Hugging Face calls
  assisted generation). A rejected draft token is then replaced from the qualifier's
  distribution (its residual), so the stream reaching the target is distributed as
  M_Q: the note's "quality floor ~ M_Q". This reading of "when M_Q rejects, sample
  from M_Q's distribution" is ours; ``tau_q`` is unused.

Choices where the reference says "not found":

- The paper's divergence: the default is FSD's ``js_div``; all four of
  ``policies.divergences`` are options, with FSD's top-k bucketing.
- Thresholds: the paper grid-searched tau in {0.2, 0.3, 0.4, 0.5} and found
  tau_Q <= tau_T best. That order is enforced (variant F). The defaults tau_Q = 0.3 and
  tau_T = 0.4 are FSD's README example (js_div, T = 0.4) for the target and one grid
  step below it for the qualifier.
- Lengths: l_D in {2, 4, 6}, l_Q in {1, ..., 25}, best at l_D ~ l_Q / 2. Defaults 4 and 8.

Not lossless. Limits: tau = 0 keeps only positions where the two distributions
are identical, which is per-position target sampling: exactly the target's
distribution. A threshold above the divergence's maximum keeps every draft token:
the draft's distribution (F) or the qualifier's (A). Rejected tokens are not kept
in the trace. A verifier's full rows cross the protocol even under greedy decoding:
the divergence needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from policies.divergences import Divergence, divergence
from policies.levels import Block, ChainPolicy, Level, Lossless
from policies.token_level import SerialDraftParams

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Scores


class PyramidParams(SerialDraftParams):
    type: Literal["pyramid"] = "pyramid"
    variant: Literal["F", "A"] = Field("F", description="F: fuzzy at both stages; A: lossless at the qualifier")
    draft_tokens: int = Field(4, ge=1, le=64, description="draft tokens per call (l_D)")
    qualifier_tokens: int = Field(8, ge=1, le=128, description="tokens the qualifier holds before the target (l_Q)")
    divergence: Divergence = "js_div"
    divergence_top_k: int = Field(0, ge=0, description="FSD's top_k_*: the verifier's top-k plus one rest bucket")
    tau_q: float = Field(0.3, ge=0, description="qualifier threshold on Div(P_Q, P_D) (variant F)")
    tau_t: float = Field(0.4, ge=0, description="target threshold on Div(P_T, P_Q)")

    @model_validator(mode="after")
    def _ordered(self) -> PyramidParams:
        if self.variant == "F" and self.tau_q > self.tau_t:  # A has no qualifier threshold
            raise ValueError(f"PyramidSD needs tau_q <= tau_t (got tau_q={self.tau_q}, tau_t={self.tau_t})")
        return self


@dataclass(frozen=True)
class Fuzzy:
    """FSD's rule: keep positions while Div(p, q) <= threshold; the verifier's own draw replaces the first miss."""

    kind: Divergence
    threshold: float
    top_k: int = 0

    def reads_rows(self, greedy: bool) -> bool:
        return True

    def reads_q(self, greedy: bool) -> bool:
        return False

    def pass_reads(self, session: Session, block: Block) -> dict:
        return {"full_dists": True, "full_next": not block.ended, "sample": session.gen_params()}

    async def decide(self, session: Session, roles: tuple[str, str], ids: Sequence[int], s: Scores, block: Block,
                     rng: torch.Generator) -> tuple[int, int | None, float | None]:
        """The verifier's own draw (``Scores.sampled``) replaces the first miss; its log-probability is not read."""
        div = divergence(self.kind, torch.tensor(s.dists).exp(), torch.tensor(block.dists).exp(), self.top_k)
        misses = (div > self.threshold).nonzero()
        if len(misses):
            i = int(misses[0, 0])
            return i, s.sampled[i], None
        return len(block.token_ids), None if block.ended else s.sampled[-1], None


class PyramidSD(ChainPolicy):
    name = "pyramid"
    params: PyramidParams

    def chain(self) -> list[Level]:
        p = self.params
        fuzzy = lambda tau: Fuzzy(p.divergence, tau, p.divergence_top_k)  # noqa: E731
        qualifier = fuzzy(p.tau_q) if p.variant == "F" else Lossless()
        return [Level("small", p.draft_tokens), Level("mid", p.qualifier_tokens, qualifier),
                Level("large", rule=fuzzy(p.tau_t))]
