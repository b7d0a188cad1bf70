"""Hierarchical speculative decoding (HSD; Globerson, Kaplan, Mansour, Mohri, Schuster; arXiv 2510.19705).

A hierarchy of drafts, small -> mid -> large, every level verifying the one below
with the lossless rule (``policies.levels.Lossless``), so the output has the
large model's distribution exactly (greedy: LargeOnly's text token for token). The
mechanism is ``policies.levels``:

- the small model (M_0) is the only one that generates: ``draft_tokens`` (T_0) per call;
- the mid model (M_1) verifies each small draft in one scoring pass, keeps its
  accepted prefix plus its own token (the residual draw at the first rejection, or
  the bonus token), and asks for more drafts while it holds fewer than ``mid_tokens``
  (T_1) tokens;
- the large model (M_2) verifies the mid model's block in one pass per round.

Defaults: the paper's example hierarchy uses T_0 = 3, T_1 = 6 (and T_2 = 12 for a
fourth level); its models and tasks were not found. With the mid model equal to the
small one the rule still holds (mid accepts everything under greedy decoding), which
the arith configs use until a world with a real mid model exists. The paper's
closed-form latency model and its search for the optimal hierarchy are not part of
this policy: the hierarchy is configuration.

Acceptance counters (``proposed``/``accepted``) are the large model's: the tokens of
the mid blocks it was shown and kept. The mid model's work shows in its own token
and call counts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from policies.levels import ChainPolicy, Level, Lossless
from policies.token_level import SerialDraftParams


class HierarchicalParams(SerialDraftParams):
    type: Literal["hierarchical"] = "hierarchical"
    draft_tokens: int = Field(3, ge=1, le=64, description="small tokens per draft call (T_0)")
    mid_tokens: int = Field(6, ge=1, le=128, description="tokens the mid model holds before the large one verifies (T_1)")


class HierarchicalSD(ChainPolicy):
    name = "hierarchical"
    params: HierarchicalParams

    def chain(self) -> list[Level]:
        p = self.params
        return [Level("small", p.draft_tokens), Level("mid", p.mid_tokens, Lossless()), Level("large", rule=Lossless())]
