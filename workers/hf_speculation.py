"""Token-level speculation inside the hf backend: prompt lookup (n-gram) and a draft model.

A proposer offers each decoding row a few next tokens; the target model checks
them all in the row's next forward pass (see ``HFWorker._decode_round``), and
keeps proposals while its own sampled token equals them. Proposals are
deterministic (n-gram lookup, or the draft model's greedy continuation, as vLLM's
default ``draft_sample_method``), so "sample, then compare" is exactly lossless:
greedy output is unchanged and the sampling distribution too.

The draft model is a second ``HFWorker`` driven synchronously from the target's
engine thread, so it reuses its own prefix cache (each step extends the previous
one; rejected tails are cropped) and batches all rows in one pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.protocol import GenParams

if TYPE_CHECKING:
    from workers.hf_backend import HFWorker, _Request


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens, propose what followed."""

    def __init__(self, k: int, n_min: int, n_max: int):
        if n_min > n_max:
            raise ValueError(f"prompt_lookup_min ({n_min}) must not exceed prompt_lookup_max ({n_max})")
        self.k, self.n_min, self.n_max = k, n_min, n_max

    def propose_one(self, seq: list[int], k: int) -> list[int]:
        for n in range(min(self.n_max, len(seq) - 1), self.n_min - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    return seq[start + n : start + n + k]
        return []

    def propose(self, rows: list[_Request]) -> list[list[int]]:
        return [self.propose_one(r.ids + r.generated, min(self.k, r.params.max_tokens - len(r.generated) - 1))
                for r in rows]


class DraftProposer:
    """A small model's greedy continuation of every row, in one batched synchronous call."""

    def __init__(self, draft: HFWorker, k: int):
        self.draft, self.k = draft, k

    def propose(self, rows: list[_Request]) -> list[list[int]]:
        from workers.hf_backend import _Request

        reqs = []
        for r in rows:
            k = min(self.k, r.params.max_tokens - len(r.generated) - 1)
            if k > 0:
                reqs.append(_Request("generate", r.ids + r.generated, None, None, params=GenParams(max_tokens=k)))
            else:
                reqs.append(None)
        live = [q for q in reqs if q is not None]
        if live:
            self.draft.run_sync(live)
        return [[] if q is None else q.result.token_ids for q in reqs]


def make_speculator(spec: Any, target: HFWorker) -> NgramProposer | DraftProposer:
    """Build the configured proposer, failing at start-up on what cannot work."""
    from workers.hf_drafts import ConfidentDraft, derived_draft
    from workers.protocol import vocab_fingerprint

    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return NgramProposer(k, spec.prompt_lookup_min, spec.prompt_lookup_max)
    if spec.method == "draft":
        if not spec.model:
            raise ValueError("speculative.method=draft needs speculative.model (the draft model's folder)")
        draft = ConfidentDraft(spec.model, device=str(target.device), kv_cache_tokens=target.cache.max_tokens,
                               speculative=spec.draft, stop_below=spec.draft_confidence)
        if vocab_fingerprint(draft.tokenizer) != vocab_fingerprint(target.tokenizer):
            raise ValueError(f"draft model {spec.model} has a different vocabulary from the target "
                             f"{target.model_path}; token-level speculation needs the same tokenizer")
        return DraftProposer(draft, k)
    if spec.method in ("quantized", "kangaroo"):
        return DraftProposer(derived_draft(spec, target), k)
    raise ValueError(f"speculative.method={spec.method} is not supported by the hf backend "
                     "(ngram, draft, quantized, kangaroo); "
                     "EAGLE heads run on the vllm backend")
