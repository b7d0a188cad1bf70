"""The draft-and-verify loop shared by token-level policies across two workers.

The small model drafts up to ``draft_tokens`` tokens, the large model checks them
in one scoring pass, and a policy-specific rule decides how many to keep and
which large-model token follows. Working in token ids (not text) needs one shared
vocabulary, checked at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from policies.base import Policy, PolicyParams

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation, TokenLogprob


class DraftVerifyParams(PolicyParams):
    draft_tokens: int = Field(8, ge=1, le=64)


def cut(session: Session, draft: Generation, n: int) -> Generation:
    """``draft`` with its first ``n`` tokens only (a cut draft ends by length, not EOS: a large token follows)."""
    if n >= len(draft.token_ids):
        return draft
    return draft.model_copy(update={
        "token_ids": draft.token_ids[:n], "text": session.models["small"].decode(draft.token_ids[:n]),
        "finish_reason": "length", "stop_reason": None,
        "logprobs": draft.logprobs[:n] if draft.logprobs is not None else None,
        "sample_logprobs": draft.sample_logprobs[:n] if draft.sample_logprobs is not None else None,
    })


def top_probability(lp: TokenLogprob) -> float:
    """The top-1 probability of a generated position (asked with ``logprobs >= 1``; its own token's if higher).

    A function of the position's distribution, not of the token drawn there: rules that
    decide from it what to verify keep speculative sampling lossless.
    """
    return math.exp(max([lp.logprob, *lp.top.values()]))


def reject_draft(session: Session, tokens: Sequence[int], note: str) -> None:
    """Put draft tokens a lossy rule turned down into the trace, with the rule's reason (they stay out of the text)."""
    if tokens:
        session.reject("small", session.models["small"].decode(list(tokens)), len(tokens), kind="tokens", note=note)


class DraftVerifyPolicy(Policy):
    roles = ("small", "large")
    shared_vocab = True
    params: DraftVerifyParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        """(number of draft tokens kept, the large model's next token or None).

        The next token replaces the first rejected draft token, or follows a fully
        accepted draft (the bonus token); it comes from the same scoring pass.
        """
        raise NotImplementedError

    async def draft(self, session: Session, ids: Sequence[int]) -> Generation:
        """The round's proposal: up to ``draft_tokens`` small-model tokens after ``ids``.

        Policies that read the draft's own signals (BiLD's confidence, Speculative
        Verification's predicted acceptance) override this to ask for logprobs and cut
        the draft (``cut``) before it is verified; only what is returned counts as proposed.
        """
        return await session.generate("small", ids=ids, max_tokens=min(self.params.draft_tokens, session.budget_left))

    async def round(self, session: Session, ids: Sequence[int]) -> tuple[Generation, int, int | None]:
        """One round: (the proposal, how many of its tokens are kept, the large model's next token or None).

        Multi-candidate verification overrides this: it drafts several proposals at
        once and returns the one whose prefix it keeps.
        """
        draft = await self.draft(session, ids)
        n_keep, nxt = await self.verify(session, ids, draft)
        return draft, n_keep, nxt

    def accept_draft(self, session: Session, draft: Generation, n_keep: int) -> None:
        """Put the kept draft tokens into the reasoning as the small model's.

        A draft handed up a chain of models (``policies.levels.Block``) has several
        authors and overrides this to name them.
        """
        if n_keep:
            session.accept_tokens("small", draft.token_ids[:n_keep])

    async def run(self, session: Session) -> None:
        while not session.finished and not session.out_of_budget:
            ids = session.log("large")  # one shared vocabulary: the small model drafts on the same ids
            draft, n_keep, nxt = await self.round(session, ids)
            session.tally(proposed=len(draft.token_ids), accepted=n_keep)
            self.accept_draft(session, draft, n_keep)
            if nxt is not None and not session.finished and not session.out_of_budget:  # never past the budget
                session.tally(handoffs=int(n_keep < len(draft.token_ids)))
                session.accept_tokens("large", [nxt], scored=True,  # written through a scoring pass
                                      replaces_draft=n_keep < len(draft.token_ids))
