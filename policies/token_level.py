"""The draft-and-verify loop shared by token-level policies across two workers.

The small model drafts up to ``draft_tokens`` tokens, the large model checks them
in one scoring pass, and a policy-specific rule decides how many to keep and
which large-model token follows. Working in token ids (not text) needs one shared
vocabulary, checked at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from policies.base import Policy, PolicyParams

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class DraftVerifyParams(PolicyParams):
    draft_tokens: int = Field(8, ge=1, le=64)


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

    async def run(self, session: Session) -> None:
        while not session.finished and not session.out_of_budget:
            ids = session.log("large")  # one shared vocabulary: the small model drafts on the same ids
            draft = await session.generate("small", ids=ids, max_tokens=min(self.params.draft_tokens, session.budget_left))
            n_keep, nxt = await self.verify(session, ids, draft)
            kept = draft.token_ids[:n_keep]
            session.tally(proposed=len(draft.token_ids), accepted=n_keep)
            if kept:
                session.accept_tokens("small", kept)
            if nxt is not None and not session.finished and not session.out_of_budget:  # never past the budget
                session.tally(handoffs=int(n_keep < len(draft.token_ids)))
                session.accept_tokens("large", [nxt], scored=True,  # written through a scoring pass
                                      replaces_draft=n_keep < len(draft.token_ids))
