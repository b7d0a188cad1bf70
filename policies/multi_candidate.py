"""Multi-candidate speculative decoding: k drafts verified losslessly in one large pass.

MCSD (Yang et al., arXiv 2401.06706; code NJUNLP/MCSD ``strategies.py``) and RSD
(Jeon et al., arXiv 2402.14160) across two workers. Each round the small model
writes ``candidates`` (k) drafts of up to ``draft_tokens`` tokens. The large model
scores all of them in one round of concurrent calls, which the backend batches into
one pass; the small model's rows come the same way. Identical drafts are scored once.
The drafts form a tree through their shared prefixes. At each depth the candidates
are the next tokens of the drafts that still agree with what was kept, and the
recursive rule (``policies.speculative.recursive_accept``) is applied to them: accept
x_j with probability min(1, p(x_j)/q(x_j)), else p <- norm(max(0, p - q)) and try
the next. One is kept and only the drafts carrying it go on. When every candidate
is rejected, the token is drawn from the last residual. After a kept leaf, a bonus
token comes from p. The output has the large model's distribution exactly.

``replacement`` picks how candidates are drawn, and the rule matches it:

- ``true`` (MCSD ``_MCSSwReplacement``): k independent small-model drafts. Siblings
  are i.i.d. from q at every depth, repeats included, and q stays fixed.
- ``false`` (MCSD ``_MCSSwoReplacement``, RSD's siblings without replacement): k
  distinct first tokens drawn without replacement from the small model's sampling
  distribution at the root (policy-side, from one small pass), each continued by the
  small model. After each rejection q loses the rejected token and is renormalised.
  Below the root the drafts are distinct, so the rest is the single-draft rule.
  RSD draws whole sequences without replacement (Gumbel-top-k over a tree, or
  stochastic beam search); only the root level is drawn that way here.

Under greedy decoding the k candidates are the small model's top-k first tokens
(one small prefill pass), each continued greedily; k i.i.d. greedy drafts would be
one draft k times. The large model's argmax is read inside the worker, and the
output equals LargeOnly's token for token. MCSD's own greedy case (a temperature-0
draft under a sampled target: top-k candidates with q = softmax over the top-k
logits) does not arise here, since both models share the run's temperature.

Not included. SpecTr's K-SEQ selection: its exact acceptance and residual formulas
are not in the reference. MCSD's naive mode (draw y ~ p, accept if some candidate
equals it). Tree shapes other than k drafts (MCSD's per-depth ``k_config``).
Counters: ``proposed`` is the length of the draft followed, ``accepted`` the tokens
kept from it. Every candidate's tokens count as small-model tokens written. Each
concurrent call counts as one forward pass of its model, although the backend may
batch them into one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from policies.levels import Block, BlockDraftPolicy, eos_ids
from policies.speculative import recursive_accept, row_probs
from policies.token_level import SerialDraftParams
from workers.protocol import joined
from workers.sampling import draw

if TYPE_CHECKING:
    from orchestrator.session import Session


class MultiCandidateParams(SerialDraftParams):
    type: Literal["multi-candidate"] = "multi-candidate"
    candidates: int = Field(2, ge=1, le=16, description="drafts per round (k)")
    replacement: bool = Field(True, description="i.i.d. drafts (MCSD with replacement) or distinct first tokens")


def verify_tree(drafts: Sequence[Sequence[int]], ended: Sequence[bool], p: Sequence[torch.Tensor],
                q: Sequence[torch.Tensor], p_next: Sequence[torch.Tensor | None], rng: torch.Generator,
                replacement: bool) -> tuple[int, int, int | None]:
    """The recursive rule down the tree the drafts form: (draft followed, tokens kept, next token or None).

    ``p[i]``/``q[i]``: the large and small sampling distributions at each position of
    draft i; ``p_next[i]``: the large one after it (None when it ended with EOS).
    """
    alive, depth = list(range(len(drafts))), 0
    while True:
        longer = [i for i in alive if len(drafts[i]) > depth]
        if not longer:  # a leaf: the bonus token, unless the draft ended
            lead = alive[0]
            return lead, depth, None if ended[lead] else int(draw(p_next[lead], 1, rng))
        lead = longer[0]  # drafts in `longer` share the kept prefix, so their rows at `depth` are the same
        j, token = recursive_accept(p[lead][depth], q[lead][depth], [drafts[i][depth] for i in longer], rng,
                                    replacement)
        if j is None:
            return lead, depth, token
        alive, depth = [i for i in longer if drafts[i][depth] == token], depth + 1


def greedy_tree(drafts: Sequence[Sequence[int]], ended: Sequence[bool],
                argmax: Sequence[Sequence[int]]) -> tuple[int, int, int | None]:
    """``verify_tree`` under greedy decoding: follow the drafts equal to the large model's argmax."""
    alive, depth = list(range(len(drafts))), 0
    while True:
        longer = [i for i in alive if len(drafts[i]) > depth]
        if not longer:
            lead = alive[0]
            return lead, depth, None if ended[lead] else argmax[lead][depth]
        best = argmax[longer[0]][depth]
        matching = [i for i in longer if drafts[i][depth] == best]
        if not matching:
            return longer[0], depth, best
        alive, depth = matching, depth + 1


class MultiCandidateSD(BlockDraftPolicy):
    name = "multi-candidate"
    params: MultiCandidateParams

    async def _distinct(self, session: Session, ids: Sequence[int], n: int) -> tuple[list[Block], torch.Tensor | None]:
        """Drafts with distinct first tokens (top-k under greedy; drawn without replacement otherwise).

        Returns them and, when sampling, the small model's distribution at the root they were drawn from.
        """
        k, sp = self.params.candidates, session.params
        q0 = None
        if sp.greedy:
            firsts = list((await session.next_token_logprobs("small", ids, [], top_k=k)).top)[:k]
        else:
            row = (await session.score("small", ids, [], full_next=True)).next_logprobs
            q0 = row_probs([row], sp)[0]
            firsts = torch.multinomial(q0, min(k, int((q0 > 0).sum())), replacement=False,
                                       generator=session.generator()).tolist()
        stop = eos_ids(session)

        async def grow(x: int) -> Block:
            first = Block(token_ids=[x], text="", finish_reason="eos" if x in stop else "length",
                          authors=["small"], scored=[True])  # drawn from the small model's row, not generated
            if n > 1 and x not in stop:
                g = await session.generate("small", ids=joined(ids, [x]), max_tokens=n - 1)
                rest = Block.of("small", g)
                first.add(rest.token_ids, rest.authors, rest.scored, None)
                first.finish_reason = g.finish_reason
            return first

        return list(await asyncio.gather(*(grow(x) for x in firsts))), q0

    async def round(self, session: Session, ids: Sequence[int], length: int) -> tuple[Block, int, int | None]:
        p, sp = self.params, session.params
        n = min(length, session.budget_left)
        q0 = None
        if sp.greedy or not p.replacement:
            drafts, q0 = await self._distinct(session, ids, n)
        else:
            gens = await asyncio.gather(*(session.generate("small", ids=ids, max_tokens=n) for _ in range(p.candidates)))
            drafts = [Block.of("small", g) for g in gens]
        seqs = [d.token_ids for d in drafts]
        ended = [d.ended for d in drafts]
        unique = list(dict.fromkeys(tuple(s) for s in seqs))  # identical drafts are scored once
        where = [unique.index(tuple(s)) for s in seqs]
        if sp.greedy:
            large = await asyncio.gather(*(session.score("large", ids, list(u), sample=session.gen_params())
                                           for u in unique))
            i, kept, nxt = greedy_tree(seqs, ended, [large[w].sampled for w in where])
            return drafts[i], kept, nxt
        unique_ended = [ended[where.index(j)] for j in range(len(unique))]
        calls = [session.score("large", ids, list(u), full_dists=True, full_next=not e)
                 for u, e in zip(unique, unique_ended)]
        calls += [session.score("small", ids, list(u), full_dists=True) for u in unique]
        scores = await asyncio.gather(*calls)
        large, small = scores[: len(unique)], scores[len(unique):]
        pr = [row_probs(s.dists, sp) for s in large]
        qr = [row_probs(s.dists, sp) for s in small]
        if q0 is not None:  # the root's q is the row the first tokens were drawn from
            for rows in qr:
                rows[0] = q0
        pn = [None if s.next_logprobs is None else row_probs([s.next_logprobs], sp)[0] for s in large]
        i, kept, nxt = verify_tree(seqs, ended, [pr[w] for w in where], [qr[w] for w in where],
                                   [pn[w] for w in where], session.generator(), p.replacement)
        return drafts[i], kept, nxt
