"""The draft-and-verify loop shared by token-level policies across two workers.

The small model drafts up to ``draft_tokens`` tokens, the large model checks them
in one scoring pass, and a policy-specific rule decides how many to keep and
which large-model token follows. Working in token ids (not text) needs one shared
vocabulary, checked at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from policies.base import Policy, PolicyParams
from workers.sampling import sampling_probs

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation


class DraftVerifyParams(PolicyParams):
    draft_tokens: int = Field(8, ge=1, le=64)


class DraftVerifyPolicy(Policy):
    roles = ("small", "large")
    shared_vocab = True
    params: DraftVerifyParams

    async def verify(self, session: Session, ids: list[int], draft: Generation) -> tuple[int, int | None]:
        """(number of draft tokens kept, the large model's next token or None)."""
        raise NotImplementedError

    @staticmethod
    async def sample_large(session: Session, ids: list[int]) -> int:
        """A token from the large model's sampling distribution after ``ids`` (prefix from cache)."""
        s = await session.score("large", ids, [], full_next=True)
        p = session.params
        probs = sampling_probs(torch.tensor(s.next_logprobs), p.temperature, p.top_k, p.top_p)
        return int(torch.multinomial(probs, 1, generator=session.generator()))

    async def run(self, session: Session) -> None:
        large = session.models["large"]
        ids = list(session.prompt_ids["large"])
        n_prompt, text = len(ids), ""
        eos = {t for t in (large.eos_token_id, session.models["small"].eos_token_id) if t is not None}

        def emit(author: str, tokens: list[int]) -> None:
            nonlocal text
            if author == "large":  # the large model writes through scoring passes, not generate calls
                session.metrics.tokens["large"] = session.metrics.tokens.get("large", 0) + len(tokens)
            ids.extend(tokens)
            new_text = large.decode(ids[n_prompt:])
            session.append(author, new_text[len(text):], len(tokens), kind="tokens")
            text = new_text

        while not session.finished and not session.out_of_budget:
            draft = await session.generate("small", ids=ids, max_tokens=min(self.params.draft_tokens, session.budget_left))
            n_keep, nxt = await self.verify(session, ids, draft)
            kept = draft.token_ids[:n_keep]
            session.metrics.proposed += len(draft.token_ids)
            session.metrics.accepted += n_keep
            if kept:
                emit("small", kept)
            if nxt is not None and not session.finished:
                session.metrics.handoffs += n_keep < len(draft.token_ids)
                emit("large", [nxt])
            if eos & set(kept + ([nxt] if nxt is not None else [])):
                session.finish("eos")
