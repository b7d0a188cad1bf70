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
argmax of a mixture is not in general in either model's top-k), so it happens in the
large model's worker (``workers.protocol.Fusion``, ``workers.sampling.fused_rows``):
the pass returns the fused argmax under greedy decoding and, under sampling, the fused
p at the draft tokens and draws from it, read by lossless SD's rule
(``policies.speculative.accept_or_resample``) with q carried by the draft. No
vocabulary-sized row crosses the protocol (but in the residual's last resort, as in
SD). Draft tokens the fused rule rejects go into the trace as a rejected ``tokens``
segment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from policies.judge_prompt import judge_suffix_ids
from policies.speculative import Reread, accept_or_resample, greedy_match, verifier_reads
from policies.token_level import DraftVerifyParams, DraftVerifyPolicy, reject_draft
from workers.protocol import Fusion

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


def layout(prefix: Sequence[int], draft: Sequence[int], probe: Sequence[int], position_tokens: int) -> list[int]:
    """The scored continuation after ``prefix``: draft, probe, position prefix, draft again."""
    pos = list(prefix[len(prefix) - position_tokens:]) if position_tokens else []
    return [*draft, *probe, *pos, *draft]


class ReflectiveVerification(DraftVerifyPolicy):
    name = "reflective"
    params: ReflectiveParams

    def draft_reads(self, session: Session) -> dict[str, Any]:
        """Under sampling the draft carries q at each of its tokens, as drawn (as in lossless SD)."""
        return {"sample_logprobs": not session.params.greedy}

    async def verify(self, session: Session, ids: Sequence[int], draft: Generation) -> tuple[int, int | None]:
        """One fused pass of the large model; the rule of lossless SD on the fused rows, read in the worker."""
        p = self.params
        tokens = draft.token_ids
        ended = draft.finish_reason == "eos"
        probe = probe_ids(session.models["large"].tokenizer, p.probe, p.probe_text, p.probe_prefill)
        cont = layout(ids, tokens, probe, min(p.position_tokens, len(ids)))
        fusion = Fusion(offset=len(cont) - len(tokens), alpha=p.alpha, kind=p.fusion)
        if session.params.greedy:
            s = await session.score("large", ids, cont, sample=session.gen_params(), fuse=fusion)
            n, nxt = greedy_match(tokens, s.sampled, ended)
        else:
            ps = await session.score("large", ids, cont, **verifier_reads(session), fuse=fusion)
            n, nxt, _ = await accept_or_resample(session, "large", "small", ids, tokens, draft.sample_logprobs, ended,
                                                 ps, session.generator(),
                                                 reread=lambda i: Reread("large", ids, cont, i, fusion))
        if n < len(tokens):
            reject_draft(session, tokens[n:], f"reflective verification (alpha {p.alpha}, {p.fusion}) rejected")
        return n, nxt
