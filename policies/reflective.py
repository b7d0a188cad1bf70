"""Reflective Verification ("Think Before You Accept", Wang et al.; arXiv 2505.18629): lossy.

The large model checks a draft twice in the same forward pass. Its input is

    [verified prefix][d_1..d_g][probe][position prefix][d_1..d_g]

where the probe is a short reflective prompt and the position prefix repeats the
last ``position_tokens`` tokens of the verified prefix, so the second copy of the
draft is read right after the probe, in the same local context. Under the causal
mask the first copy's rows are the plain next-token distributions p_i (nothing
after them can change them); the second copy's rows are the "reflective" ones r_i,
the model's reading of the draft after being asked to look again. The two are fused
with weight ``alpha`` and the usual verification runs on the fused distribution f_i
as if it were the large model's: greedy, keep d_i while it is f_i's argmax; sampling,
the lossless accept/reject rule of ``policies.speculative`` with f in place of p
(the run's temperature/top-k/top-p applied to f, as to a model's logits). The
replacement token and the bonus token come from f as well (the bonus rows are the
first copy's row after d_g and the row after the second copy). One large-model
``score`` call per round, as in plain speculative decoding, over about twice the
draft.

What the sources fix and what is chosen here (``algorithms-seeds.md`` section 7):
the layout and the single pass are from the paper's abstract and its reviews. The
main experiments' prompt text was not found; the tree ablation's "[BACK]" is the
default ``probe_text``. The fusion formula and default alpha were not found either:
``fusion: linear`` (default) is the mixture f = (1 - alpha) p + alpha r, the
reading of "fused with a mixing weight"; ``log-linear`` is the renormalised
geometric mixture. The default alpha = 0.1 is measured, not sourced: on the arith world (30
bench problems, probe "[BACK]") alpha 0.5 collapsed accuracy to 0.03 (the reflective rows of a
model never trained on a probe are confident and wrong), 0.25 gave 0.77 and 0.1 kept LargeOnly's
0.80. alpha = 0 is plain speculative decoding (lossless), alpha = 1 verifies with the reflective
rows alone.

The probe's layout in token space is configurable like SpecReason's judge
(``policies.judge_prompt``): ``probe: text`` puts ``probe_text`` into the
reasoning as plain text; ``probe: chat`` closes the assistant turn, asks
``probe_text`` as a user turn and opens an assistant turn pre-filled with
``probe_prefill``, through the model's own chat template. Both are built once per
tokenizer. The fusion needs the large model's full rows at the draft positions (the
argmax of a mixture is not in general in either model's top-k), so they cross the
protocol here even under greedy decoding. Draft tokens the fused rule rejects go
into the trace as a rejected ``tokens`` segment.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from policies.judge_prompt import judge_suffix_ids
from policies.speculative import accept_reject
from policies.token_level import DraftVerifyParams, DraftVerifyPolicy, reject_draft
from workers.sampling import sampling_probs

if TYPE_CHECKING:
    from orchestrator.session import Session
    from workers.protocol import Generation

DEFAULT_PROBE = "[BACK]"


class ReflectiveParams(DraftVerifyParams):
    type: Literal["reflective"] = "reflective"
    alpha: float = Field(0.1, ge=0, le=1, description="weight of the reflective distribution in the fusion")
    fusion: Literal["linear", "log-linear"] = "linear"
    probe: Literal["text", "chat"] = Field("text", description="the probe as plain text or as a chat turn")
    probe_text: str = DEFAULT_PROBE
    probe_prefill: str = Field("", description="chat probe: the opened assistant turn starts with this")
    position_tokens: int = Field(8, ge=0, description="verified tokens repeated before the second draft copy")


@functools.lru_cache(maxsize=32)
def probe_ids(tokenizer: Any, probe: str, text: str, prefill: str) -> tuple[int, ...]:
    """The probe in ``tokenizer``'s ids (a pure function of the tokenizer and the prompt, cached)."""
    if probe == "chat":
        return judge_suffix_ids(tokenizer, text, prefill)
    return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()


def fuse(plain: torch.Tensor, reflective: torch.Tensor, alpha: float, fusion: str) -> torch.Tensor:
    """Fused log-probabilities from two rows (or batches of rows) of log-probabilities."""
    if fusion == "linear":
        if alpha in (0.0, 1.0):
            return reflective if alpha == 1.0 else plain
        return torch.logaddexp(plain + math.log1p(-alpha), reflective + math.log(alpha))
    return torch.log_softmax((1 - alpha) * plain + alpha * reflective, -1)


def layout(prefix: Sequence[int], draft: Sequence[int], probe: Sequence[int], position_tokens: int) -> list[int]:
    """The scored continuation after ``prefix``: draft, probe, position prefix, draft again."""
    pos = list(prefix[len(prefix) - position_tokens:]) if position_tokens else []
    return [*draft, *probe, *pos, *draft]


class ReflectiveVerification(DraftVerifyPolicy):
    name = "reflective"
    params: ReflectiveParams

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        p, sp = self.params, session.params
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        g = len(tokens)
        probe = probe_ids(session.models["large"].tokenizer, p.probe, p.probe_text, p.probe_prefill)
        cont = layout(ids, tokens, probe, min(p.position_tokens, len(ids)))
        s = await session.score("large", ids, cont, full_dists=True, full_next=not ended)
        rows = torch.tensor(s.dists)
        off = len(cont) - g  # the second copy's first row
        plain = rows[: g + 1]  # d_1..d_g and the row after d_g
        refl = rows[off:] if ended else torch.cat([rows[off:], torch.tensor([s.next_logprobs])])
        f = fuse(plain[: len(refl)], refl, p.alpha, p.fusion)  # g rows, or g + 1 with the bonus row
        if sp.greedy:
            best = f.argmax(-1).tolist()
            n = next((i for i, x in enumerate(tokens) if best[i] != x), g)
            nxt = best[n] if n < len(best) else None
        else:
            qs = await session.score("small", ids, tokens, full_dists=True)
            probs = lambda x: sampling_probs(x, sp.temperature, sp.top_k, sp.top_p)  # noqa: E731
            pf = probs(f)
            q = probs(torch.tensor(qs.dists))
            n, nxt = accept_reject(pf[:g], q, tokens, None if ended else pf[g], session.generator())
        if n < g:
            reject_draft(session, tokens[n:], f"reflective verification (alpha {p.alpha}, {p.fusion}) rejected")
        return n, nxt
