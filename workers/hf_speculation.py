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

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.prefix_cache import as_ids
from workers.protocol import GenParams

if TYPE_CHECKING:
    from workers.hf_backend import HFWorker, _Request


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens, propose what followed.

    Each row's tokens live in a numpy buffer built once per request and extended as
    it decodes (never re-copied from the Python lists), and the search is vectorised:
    the earlier positions holding the last token are found in one pass, then narrowed
    token by token. A step costs one C-speed scan of the row, not n_max x n Python
    comparisons (32k-token rows: well under a millisecond).
    """

    def __init__(self, k: int, n_min: int, n_max: int):
        if n_min > n_max:
            raise ValueError(f"prompt_lookup_min ({n_min}) must not exceed prompt_lookup_max ({n_max})")
        self.k, self.n_min, self.n_max = k, n_min, n_max
        self._rows: weakref.WeakKeyDictionary[_Request, _Tokens] = weakref.WeakKeyDictionary()

    def propose_one(self, seq: np.ndarray, k: int) -> list[int]:
        """What followed the latest earlier occurrence of ``seq``'s last n tokens (longest n first)."""
        last = len(seq) - 1
        if last < 1 or k < 1:
            return []
        ends = np.flatnonzero(seq[:last] == seq[last])  # where an earlier occurrence would end
        for n in range(min(self.n_max, last), self.n_min - 1, -1):
            e = ends[ends >= n - 1]
            for back in range(1, n):
                if not len(e):
                    break
                e = e[seq[e - back] == seq[last - back]]
            if len(e):
                return seq[e[-1] + 1 : e[-1] + 1 + k].tolist()
        return []

    def propose(self, rows: list[_Request]) -> list[list[int]]:
        out = []
        for r in rows:
            tokens = self._rows.get(r)
            if tokens is None:
                tokens = self._rows[r] = _Tokens(r.ids)
            k = min(self.k, r.params.max_tokens - len(r.generated) - 1)
            out.append(self.propose_one(tokens.extended(r.generated), k))
        return out


class _Tokens:
    """A row's prompt and generated tokens in one growing numpy buffer."""

    def __init__(self, prompt: np.ndarray | list[int]):
        self.n_prompt = len(prompt)
        self.buf = np.empty(max(16, 2 * len(prompt)), dtype=np.int64)
        self.buf[: self.n_prompt] = prompt
        self.n = self.n_prompt

    def extended(self, generated: list[int]) -> np.ndarray:
        """The row so far, after appending the generated tokens not yet in the buffer."""
        new = generated[self.n - self.n_prompt :]
        if self.n + len(new) > len(self.buf):
            grown = np.empty(2 * (self.n + len(new)), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + len(new)] = new
        self.n += len(new)
        return self.buf[: self.n]


class DraftProposer:
    """A small model's greedy continuation of every row, in one batched synchronous call.

    With ``stop_below`` a row's proposal ends after a token the draft doubts
    (``GenParams.stop_below``): the row leaves the draft's batch at once, so hard stretches
    cost short drafts; the doubted token is still proposed (as in Kangaroo).
    """

    def __init__(self, draft: HFWorker, k: int, stop_below: float | None = None, label: str | None = None):
        self.draft, self.k, self.stop_below = draft, k, stop_below
        self.label = label or draft.model_path  # what the draft is, for reports

    def propose(self, rows: list[_Request]) -> list[list[int]]:
        from workers.hf_backend import _Request

        reqs = []
        for r in rows:
            k = min(self.k, r.params.max_tokens - len(r.generated) - 1)
            if k > 0:
                reqs.append(_Request("generate", np.concatenate([r.ids, as_ids(r.generated)]), None, None,
                                     params=GenParams(max_tokens=k, stop_below=self.stop_below)))
            else:
                reqs.append(None)
        live = [q for q in reqs if q is not None]
        if live:
            self.draft.run_sync(live)
        return [[] if q is None else q.result.token_ids for q in reqs]


def make_speculator(spec: Any, target: HFWorker) -> NgramProposer | DraftProposer:
    """Build the configured proposer, failing at start-up on what cannot work."""
    from workers.hf_backend import HFWorker
    from workers.hf_drafts import derived_draft
    from workers.protocol import vocab_fingerprint

    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return NgramProposer(k, spec.prompt_lookup_min, spec.prompt_lookup_max)
    if spec.method == "draft":
        if not spec.model:
            raise ValueError("speculative.method=draft needs speculative.model (the draft model's folder)")
        draft = HFWorker(spec.model, device=str(target.device), kv_cache_tokens=target.cache.max_tokens,
                         speculative=spec.draft)
        if vocab_fingerprint(draft.tokenizer) != vocab_fingerprint(target.tokenizer):
            raise ValueError(f"draft model {spec.model} has a different vocabulary from the target "
                             f"{target.model_path}; token-level speculation needs the same tokenizer")
        return DraftProposer(draft, k, stop_below=spec.draft_confidence)
    if spec.method in ("quantized", "kangaroo"):
        return derived_draft(spec, target)
    raise ValueError(f"speculative.method={spec.method} is not supported by the hf backend "
                     "(ngram, draft, quantized, kangaroo); "
                     "EAGLE heads run on the vllm backend")
