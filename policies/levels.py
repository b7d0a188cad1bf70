"""Token-level speculation up a chain of models: each level verifies the block handed up by the one below.

Hierarchical speculative decoding (HSD, Globerson et al., arXiv 2510.19705) and
PyramidSD (Byun et al., arXiv 2510.12966) share one mechanism. The bottom model
drafts by generating. Every model above it verifies the block from below in one
scoring pass with its rule, keeps a prefix, adds its own token (the replacement at
the first rejection, or the bonus token after a fully kept block) and asks for more
until it holds ``tokens`` of them, then hands its block up. The top model (large) is
the draft-and-verify loop's verifier (``policies.token_level``): one round per block.

A rule (``Rule``) says what it reads. The lossless rule (``Lossless``) compares
argmaxes read inside the worker under greedy decoding; under sampling it reads p
and q at a few tokens (``policies.speculative.accept_or_resample``): q at the
block's tokens, carried by the block (``sample_logprobs``), p there and a few draws
from p in the verifier's pass, and at a rejection q at those draws, asked of the
model whose distribution the block follows (the level below). PyramidSD's fuzzy
rule (``policies.pyramid.Fuzzy``) compares full raw distributions at every
position. A block carries its producer's rows, or q at its tokens, only when the
level above reads them. They come from the pass that verified the block (the
bottom's q from its generate call, its rows from one extra scoring pass over its
draft), so no level scores a token twice.

Why a chain of lossless levels is lossless: every token a lossless level hands up,
given all that came before, is distributed as that level's model. This is the
single-draft argument at each position. How many tokens a level asks for depends
only on what it already holds, so the block's length is a stopping time. The level
above verifies the block with q := the model below, so by induction the top writes
the large model's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from pydantic import Field

from policies.base import PolicyParams
from policies.speculative import accept_or_resample, greedy_match, verifier_reads
from policies.token_level import DraftVerifyPolicy
from workers.protocol import Generation, Scores, joined

if TYPE_CHECKING:
    from orchestrator.session import Session


class Block(Generation):
    """Tokens handed up to a verifier: a draft (``Generation``) whose tokens name their authors.

    ``scored[i]``: token i was read from a scoring pass or drawn by the policy, so
    it counts as written when it is accepted (a generate call counts its own).
    ``dists[i]``: the raw log-distribution (as ``Scores.dists``) at token i's position
    of the model whose distribution the block follows, and ``sample_logprobs[i]`` that
    model's sampling log-probability of token i (q), each kept when the level above reads it.
    """

    authors: list[str] = Field(default_factory=list)
    scored: list[bool] = Field(default_factory=list)
    dists: list[list[float]] | None = None

    @classmethod
    def of(cls, author: str, g: Generation, dists: list[list[float]] | None = None, *,
           scored: bool = False) -> Block:
        n = len(g.token_ids)
        return cls(token_ids=list(g.token_ids), text=g.text, finish_reason=g.finish_reason,
                   authors=[author] * n, scored=[scored] * n, dists=dists, sample_logprobs=g.sample_logprobs)

    @property
    def ended(self) -> bool:
        """The block ends with EOS: nothing follows it."""
        return self.finish_reason == "eos"

    def add(self, tokens: Sequence[int], authors: Sequence[str], scored: Sequence[bool],
            dists: Sequence[list[float]] | None, q: Sequence[float | None] | None = None) -> None:
        self.token_ids.extend(tokens)
        self.authors.extend(authors)
        self.scored.extend(scored)
        if self.dists is not None:
            self.dists.extend(dists)
        if self.sample_logprobs is not None:
            self.sample_logprobs.extend(q)

    def runs(self, n: int) -> list[tuple[str, list[int], bool]]:
        """The first ``n`` tokens as consecutive runs of (author, tokens, scored)."""
        out: list[tuple[str, list[int], bool]] = []
        for tok, author, scored in zip(self.token_ids[:n], self.authors, self.scored):
            if out and out[-1][0] == author and out[-1][2] == scored:
                out[-1][1].append(tok)
            else:
                out.append((author, [tok], scored))
        return out


class Rule(Protocol):
    """How a level verifies the block from the level below."""

    def reads_rows(self, greedy: bool) -> bool:
        """Whether it reads the block's full distributions (``Block.dists``)."""

    def reads_q(self, greedy: bool) -> bool:
        """Whether it reads q at the block's tokens (``Block.sample_logprobs``)."""

    def pass_reads(self, session: Session, block: Block) -> dict:
        """What its scoring pass over ``block`` asks of the verifier (``Worker.score`` options)."""

    async def decide(self, session: Session, roles: tuple[str, str], ids: Sequence[int], s: Scores, block: Block,
                     rng: torch.Generator) -> tuple[int, int | None, float | None]:
        """(tokens of ``block`` kept, the verifier's next token or None, that token's sampling log-probability
        under the verifier when the rule knows it) from the verifier's pass ``s``; ``roles``: (verifier, the
        role whose distribution the block follows)."""


@dataclass(frozen=True)
class Lossless:
    """The speculative-sampling rule: ``greedy_match`` under greedy decoding, else ``accept_or_resample``."""

    def reads_rows(self, greedy: bool) -> bool:
        return False

    def reads_q(self, greedy: bool) -> bool:
        return not greedy

    def pass_reads(self, session: Session, block: Block) -> dict:
        return {"sample": session.gen_params()} if session.params.greedy else verifier_reads(session)

    async def decide(self, session: Session, roles: tuple[str, str], ids: Sequence[int], s: Scores, block: Block,
                     rng: torch.Generator) -> tuple[int, int | None, float | None]:
        if session.params.greedy:
            return *greedy_match(block.token_ids, s.sampled, block.ended), None
        return await accept_or_resample(session, *roles, ids, block.token_ids, block.sample_logprobs, block.ended, s,
                                        rng)


@dataclass(frozen=True)
class Keep:
    """What a block carries for the level above: its rows, q at its tokens."""

    rows: bool = False
    q: bool = False

    @classmethod
    def reads_of(cls, rule: Rule, greedy: bool) -> Keep:
        return cls(rule.reads_rows(greedy), rule.reads_q(greedy))


@dataclass(frozen=True)
class Level:
    """One model of the chain: ``tokens`` it drafts (the bottom) or holds before handing up; its ``rule``."""

    role: str
    tokens: int = 0
    rule: Rule | None = None  # None at the bottom, which drafts by generating


def eos_ids(session: Session) -> set[int]:
    return {h.eos_token_id for h in session.models.values() if h.eos_token_id is not None}


async def check(session: Session, level: Level, producer: str, ids: Sequence[int], block: Block,
                keep: Keep) -> tuple[int, int | None, float | None, Scores]:
    """``level`` verifies ``block`` (following ``producer``'s distribution) after ``ids`` in one scoring pass:
    (kept, next token, its log-probability under ``level`` when known, the pass).

    ``keep.rows``: the level above reads this level's rows, so the pass returns them
    (over the block and after it) whatever the rule needs itself.
    """
    reads = level.rule.pass_reads(session, block)
    if keep.rows:
        reads |= {"full_dists": True, "full_next": not block.ended}
    s = await session.score(level.role, ids, block.token_ids, **reads)
    n, nxt, lp = await level.rule.decide(session, (level.role, producer), ids, s, block, session.generator())
    return n, nxt, lp, s


async def propose(session: Session, ids: Sequence[int], levels: Sequence[Level], want: int, keep: Keep) -> Block:
    """The block the last of ``levels`` hands up after ``ids``: at most ``want`` tokens, carrying ``keep``."""
    *below, level = levels
    if not below:  # the bottom drafts
        g = await session.generate(level.role, ids=ids, max_tokens=min(level.tokens, want), sample_logprobs=keep.q)
        dists = (await session.score(level.role, ids, g.token_ids, full_dists=True)).dists if keep.rows else None
        return Block.of(level.role, g, dists)
    block = Block(token_ids=[], text="", finish_reason="length", dists=[] if keep.rows else None,
                  sample_logprobs=[] if keep.q else None)
    stop = eos_ids(session)
    reads = Keep.reads_of(level.rule, session.params.greedy)
    while len(block.token_ids) < min(level.tokens, want) and not block.ended:
        ctx = joined(ids, block.token_ids) if block.token_ids else ids
        sub = await propose(session, ctx, below, want - len(block.token_ids), reads)
        n, nxt, lp, s = await check(session, level, below[-1].role, ctx, sub, keep)
        block.add(sub.token_ids[:n], sub.authors[:n], sub.scored[:n], s.dists[:n] if keep.rows else None,
                  s.sample_logprobs[:n] if keep.q else None)
        if n == len(sub.token_ids) and sub.ended:
            block.finish_reason = "eos"
        elif nxt is not None and len(block.token_ids) < want:  # never past the budget
            assert lp is not None or not keep.q, f"{level.role}'s rule cannot hand q up to a lossless level"
            row = (s.dists[n] if n < len(sub.token_ids) else s.next_logprobs) if keep.rows else None
            block.add([nxt], [level.role], [True], [row], [lp])
            if nxt in stop:
                block.finish_reason = "eos"
    return block


class BlockDraftPolicy(DraftVerifyPolicy):
    """A draft-and-verify policy whose drafts are ``Block``s: kept tokens go in under their own authors."""

    def accept_draft(self, session: Session, draft: Block, n_keep: int) -> None:
        for author, tokens, scored in draft.runs(n_keep):
            session.accept_tokens(author, tokens, scored=scored)


class ChainPolicy(BlockDraftPolicy):
    """A draft-and-verify policy whose draft is the block handed up a chain of models below the large one.

    Subclasses give the chain (``chain``): the levels from the bottom up, the large
    model last with its rule.
    """

    roles: ClassVar[tuple[str, ...]] = ("small", "mid", "large")

    def __init__(self, params: PolicyParams):
        super().__init__(params)
        self.levels = self.chain()

    def chain(self) -> list[Level]:
        raise NotImplementedError

    async def draft(self, session: Session, ids: Sequence[int], length: int) -> Block:
        """The block the chain below the large model hands up; its levels set their own lengths (a chain's
        params keep ``draft_schedule`` constant, so ``length`` is always ``draft_tokens``, the bottom's own)."""
        *below, top = self.levels
        return await propose(session, ids, below, session.budget_left, Keep.reads_of(top.rule, session.params.greedy))

    async def verify(self, session: Session, ids: Sequence[int], draft: Block) -> tuple[int, int | None]:
        n, nxt, _, _ = await check(session, self.levels[-1], self.levels[-2].role, ids, draft, Keep())
        return n, nxt
