"""The draft-and-verify loop shared by token-level policies across two workers.

The small model drafts up to ``draft_tokens`` tokens, the large model checks them
in one scoring pass, and a policy-specific rule decides how many to keep and
which large-model token follows. Working in token ids (not text) needs one shared
vocabulary, checked at start-up. Where the two engines can work at once, rounds
overlap: the small model drafts the next round while the large one verifies this
one (``DraftVerifyPolicy.draft_ahead``); the text is the same either way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from policies.base import Policy, PolicyParams, discard, engines_apart
from workers.protocol import joined

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation, TokenLogprob


MAX_DRAFT = 64  # the longest draft a round makes (a bound of ``draft_tokens`` and of a schedule's growth)


class DraftVerifyParams(PolicyParams):
    draft_tokens: int = Field(8, ge=1, le=MAX_DRAFT, description="tokens drafted per round (the first round's under "
                                                                 "a heuristic draft_schedule)")
    draft_schedule: Literal["constant", "heuristic"] = Field(
        "constant", description="the draft length round by round: always draft_tokens, or HF's heuristic schedule "
                                "(num_assistant_tokens_schedule): +2 after a round whose whole draft was kept, -1 (not "
                                "under 1) otherwise, per request, up to 64; see DraftVerifyPolicy.next_length")
    pipeline: bool | None = Field(None, description="draft the next round while this one is verified (see "
                                                  "DraftVerifyPolicy.run); None: when the two engines can work at once "
                                                  "(policies.base.engines_apart)")
    draft_confidence: float | None = Field(
        None, gt=0, lt=1, description="end a draft after a token whose small-model top-1 probability is under this "
                                      "(GenParams.stop_below: the small model stops in its worker where it doubts "
                                      "itself, as HF's assistant_confidence_threshold); None: always draft_tokens")
    ahead_alternative: float | None = Field(
        None, gt=0, le=1, description="pipelined, also draft ahead for a rejection: from the draft's least sure "
                                      "position, when its small-model top-1 probability is under this, with the small "
                                      "model's second choice there (DraftVerifyPolicy.alternative_ahead); None: off")


class SerialDraftParams(DraftVerifyParams):
    """For policies whose drafting has effects of its own (cuts it records, several models, several drafts):
    a draft made ahead and thrown away would leave them behind, so rounds run one after another."""

    pipeline: Literal[False] = Field(False, description="this policy drafts round by round")
    draft_schedule: Literal["constant"] = Field("constant", description="this policy's draft lengths are its own")
    draft_confidence: Literal[None] = Field(None, description="this policy's drafts follow rules of their own")
    ahead_alternative: Literal[None] = Field(None, description="this policy drafts round by round")


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


def without_first(session: Session, draft: Generation) -> Generation:
    """``draft`` less its first token (a draft made ahead whose first token the large model wrote itself)."""
    return draft.model_copy(update={
        "token_ids": draft.token_ids[1:], "text": session.models["small"].decode(draft.token_ids[1:]),
        "logprobs": draft.logprobs[1:] if draft.logprobs is not None else None,
        "sample_logprobs": draft.sample_logprobs[1:] if draft.sample_logprobs is not None else None,
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

    async def draft(self, session: Session, ids: Sequence[int], length: int) -> Generation:
        """The round's proposal: up to ``length`` small-model tokens after ``ids`` (``next_length``).

        Policies that read the draft's own signals (BiLD's confidence, Speculative
        Verification's predicted acceptance) override this to ask for logprobs and cut
        the draft (``cut``) before it is verified; only what is returned counts as proposed.
        """
        return await session.generate("small", ids=ids, max_tokens=min(length, session.budget_left),
                                      **self.draft_call(session))

    def next_length(self, length: int, drafted: int, kept: int) -> int:
        """The next round's draft length after a round of ``length`` that drafted ``drafted`` tokens and kept ``kept``.

        The heuristic schedule is Hugging Face's (assisted generation's
        ``num_assistant_tokens_schedule="heuristic"``): a draft kept whole says the text is
        easy here, so the next one is two tokens longer; any rejection shortens it by one.
        On reasoning chains, where long stretches of restating and re-checking alternate
        with hard arithmetic, the length follows the stretch. It reads only the past
        rounds, so lossless verification stays lossless.
        """
        if self.params.draft_schedule == "constant":
            return length
        return min(MAX_DRAFT, length + 2) if kept == drafted else max(1, length - 1)

    def draft_reads(self, session: Session) -> dict[str, Any]:
        """What a draft call reads besides its tokens (lossless sampling: q at each drawn token)."""
        return {}

    def draft_call(self, session: Session) -> dict[str, Any]:
        """A draft call's parameters besides its length: its reads and where it stops short (``draft_confidence``).

        The stop reads only the small model's own distribution at each position, so it
        keeps lossless verification lossless.
        """
        p = self.params
        stop = {} if p.draft_confidence is None else {"stop_below": p.draft_confidence}
        alternatives = {} if p.ahead_alternative is None else {"logprobs": 2}  # top-2: each position's second choice
        return {**self.draft_reads(session), **stop, **alternatives}

    async def round(self, session: Session, ids: Sequence[int], length: int) -> tuple[Generation, int, int | None]:
        """One round of drafts up to ``length``: (the proposal, how many of its tokens are kept, the large model's
        next token or None).

        Multi-candidate verification overrides this: it drafts several proposals at
        once and returns the one whose prefix it keeps.
        """
        draft = await self.draft(session, ids, length)
        n_keep, nxt = await self.verify(session, ids, draft)
        return draft, n_keep, nxt

    def accept_draft(self, session: Session, draft: Generation, n_keep: int) -> None:
        """Put the kept draft tokens into the reasoning as the small model's.

        A draft handed up a chain of models (``policies.levels.Block``) has several
        authors and overrides this to name them.
        """
        if n_keep:
            session.accept_tokens("small", draft.token_ids[:n_keep])

    def draft_ahead(self, session: Session, ids: Sequence[int], draft: Generation,
                    length: int) -> asyncio.Future | None:
        """Start the next round's draft as if the large model keeps all of ``draft``, while it verifies it.

        ``length`` is the next round's draft length in that case. It drafts one token more: its first
        token is the small model's guess at the large model's next token. When the large model does
        keep the whole draft and its next token is that guess, the rest is exactly the draft the next
        round would make (the same context, drawn from the same q), so that round verifies at once:
        the small model drafts while the large one verifies, as in parallel speculative
        decoding, instead of both waiting in turn. Otherwise the draft is dropped (the small
        model would have sat idle meanwhile). None when keeping ``draft`` ends the request.
        """
        room = session.budget_left - len(draft.token_ids)  # the large model's next token takes one of these
        if draft.finish_reason == "eos" or room < 2:
            return None
        return asyncio.ensure_future(session.generate(
            "small", ids=joined(ids, draft.token_ids), max_tokens=min(length + 1, room),
            **self.draft_call(session)))

    def alternative_ahead(self, session: Session, ids: Sequence[int], draft: Generation,
                          length: int) -> Alternative | None:
        """Start the next round's draft for one way the large model may reject ``draft``, while it verifies it.

        The guess (``ahead_alternative``): the large model turns the draft down at its least
        sure position (the lowest small-model top-1 probability, when under the threshold) and
        writes the small model's second choice there. Measured on the arith world (Consultant,
        30 problems, rounds in turn): of 798 rejections, 63% came at that position, 51% wrote
        that second choice, 40% both. Where the guess holds, the round after a rejection
        verifies at once instead of waiting for a fresh draft. The draft is the one that round
        would make (the same context, drawn from q on its own), so lossless verification stays
        lossless; ``length`` is the current round's (``next_length`` after a rejection applies).
        """
        gate = self.params.ahead_alternative
        if gate is None or not draft.logprobs:
            return None
        sure = [top_probability(lp) for lp in draft.logprobs]
        at = min(range(len(sure)), key=sure.__getitem__)
        lp = draft.logprobs[at]
        others = {t: v for t, v in {**lp.top, lp.token_id: lp.logprob}.items() if t != draft.token_ids[at]}
        room = session.budget_left - at - 1  # the kept tokens and the large model's token come first
        if sure[at] >= gate or not others or room < 1:
            return None
        token = max(others, key=others.__getitem__)
        n = min(self.next_length(length, len(draft.token_ids), at), room)
        return Alternative(at, token, asyncio.ensure_future(session.generate(
            "small", ids=joined(ids, [*draft.token_ids[:at], token]), max_tokens=n, **self.draft_call(session))))

    def pipelined(self, session: Session) -> bool:
        """Whether rounds overlap: ``pipeline``, by default when the two engines can work at once."""
        p = self.params.pipeline
        return engines_apart(session, "small", "large") if p is None else p

    async def run(self, session: Session) -> None:
        """Rounds until EOS or the budget; pipelined (``pipelined``), each round's draft is made during the
        previous round's verification when it can be (``draft_ahead``, ``alternative_ahead``)."""
        pipelined = self.pipelined(session)
        length = self.params.draft_tokens
        ready: Generation | None = None  # this round's draft, made ahead
        ahead: asyncio.Future | None = None
        alternative: Alternative | None = None
        try:
            while not session.finished and not session.out_of_budget:
                ids = session.log("large")  # one shared vocabulary: the small model drafts on the same ids
                if pipelined:
                    draft = ready if ready is not None else await self.draft(session, ids, length)
                    n = len(draft.token_ids)
                    verifying = asyncio.ensure_future(self.verify(session, ids, draft))
                    ahead = self.draft_ahead(session, ids, draft, self.next_length(length, n, n))
                    alternative = self.alternative_ahead(session, ids, draft, length)
                    n_keep, nxt = await verifying
                else:
                    draft, n_keep, nxt = await self.round(session, ids, length)
                session.tally(proposed=len(draft.token_ids), accepted=n_keep)
                length = self.next_length(length, len(draft.token_ids), n_keep)
                self.accept_draft(session, draft, n_keep)
                if nxt is not None and not session.finished and not session.out_of_budget:  # never past the budget
                    session.tally(handoffs=int(n_keep < len(draft.token_ids)))
                    session.accept_tokens("large", [nxt], scored=True,  # written through a scoring pass
                                          replaces_draft=n_keep < len(draft.token_ids))
                ready = None
                going_on = not session.finished and not session.out_of_budget
                if ahead is not None:
                    kept_all = n_keep == len(draft.token_ids) and nxt is not None
                    if kept_all and going_on:
                        ready = await _made_ahead(session, ahead, nxt)
                    discard(ahead)  # done with, or not needed
                    ahead = None
                if alternative is not None:
                    if going_on and (n_keep, nxt) == (alternative.at, alternative.token):
                        ready = await _answer(alternative.call)
                    discard(alternative.call)
                    alternative = None
        finally:
            for call in (ahead, alternative and alternative.call):
                if call is not None:
                    discard(call)


@dataclass(frozen=True)
class Alternative:
    """A draft made ahead for the round after the large model rejects the draft at ``at`` and writes ``token``."""

    at: int
    token: int
    call: asyncio.Future


async def _answer(call: asyncio.Future) -> Generation | None:
    """A draft made ahead, or None where it failed (e.g. no room left in the context: the next round's own draft
    says so)."""
    try:
        return await call
    except Exception:  # noqa: BLE001
        return None


async def _made_ahead(session: Session, ahead: asyncio.Future, nxt: int) -> Generation | None:
    """The draft made ahead, after its first token, if that was the large model's next token ``nxt``."""
    g = await _answer(ahead)
    return without_first(session, g) if g is not None and len(g.token_ids) > 1 and g.token_ids[0] == nxt else None
