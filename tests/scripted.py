"""Scripted workers for unit-testing policy rules (real-model tests live beside them).

``CharTokenizer`` maps characters to ids (digits are single tokens, like the arith
tokenizer); ``ScriptedWorker`` answers generate/judge calls from queues, and
``TableWorker`` is a tiny language model with a fixed next-token distribution per
context length, for testing token-level rules exactly.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from orchestrator.session import ModelHandle, Session
from workers.protocol import Generation, GenParams, Scores, WorkerInfo, WorkerStats
from workers.sampling import sampling_probs

EOS = 3


class CharTokenizer:
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, continue_final_message=False):
        text = "".join(f"<{m['role']}>{m['content']}" + ("" if continue_final_message and i == len(messages) - 1
                                                           else "</>") for i, m in enumerate(messages))
        return text + ("<assistant>" if add_generation_prompt else "")


class _Base:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def info(self) -> WorkerInfo:
        return WorkerInfo(model_id="scripted", backend="scripted", device="cpu", vocab_size=256,
                          vocab_fingerprint="chars", context_length=4096, eos_token_id=EOS)

    async def stats(self) -> WorkerStats:
        return WorkerStats()

    async def close(self) -> None:
        pass


class ScriptedWorker(_Base):
    """Returns scripted generations (text, finish_reason) and judge scores in order."""

    def __init__(self, generations: list[tuple[str, str]] = (), judge_scores: list[int] = ()):
        super().__init__()
        self.generations = deque(generations)
        self.judge_scores = deque(judge_scores)

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        self.calls.append(("generate", (len(prompt_ids), params.max_tokens)))
        text, reason = self.generations.popleft()
        ids = [ord(c) for c in text][: params.max_tokens]
        return Generation(token_ids=ids + ([EOS] if reason == "eos" else []), text=text, finish_reason=reason,
                          stop_reason=params.stop[0] if reason == "stop" else None)

    async def next_token_logprobs(self, prefix_ids: list[int], candidates: list[int]) -> dict[int, float]:
        self.calls.append(("judge", (len(prefix_ids),)))
        d = self.judge_scores.popleft()
        return {c: (math.log(0.9) if c == ord(str(d)) else math.log(0.1 / 9)) for c in candidates}

    async def score(self, prefix_ids, continuation_ids, **kw) -> Scores:
        raise AssertionError("not scripted")


class TableWorker(_Base):
    """A language model over tokens {0, 1, 2, EOS}: fixed logits per position."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def _row(self, pos: int) -> torch.Tensor:
        return self.logits[min(pos, len(self.logits) - 1)]

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        g = torch.Generator().manual_seed(params.seed or 0)
        ids = list(prompt_ids)
        out = []
        for _ in range(params.max_tokens):
            row = self._row(len(ids))
            tok = int(row.argmax()) if params.greedy else int(torch.multinomial(
                sampling_probs(row, params.temperature, params.top_k, params.top_p), 1, generator=g))
            out.append(tok)
            ids.append(tok)
            if tok == EOS:
                break
        return Generation(token_ids=out, text="", finish_reason="eos" if out[-1] == EOS else "length")

    async def score(self, prefix_ids, continuation_ids, top_k=0, entropies=False, full_dists=False,
                    full_next=False) -> Scores:
        n = len(prefix_ids)
        rows = [torch.log_softmax(self._row(n + i), -1) for i in range(len(continuation_ids))]
        nxt = torch.log_softmax(self._row(n + len(continuation_ids)), -1)
        return Scores(
            logprobs=[float(r[t]) for r, t in zip(rows, continuation_ids)],
            top=[{int(r.argmax()): float(r.max())} for r in rows] if top_k else None,
            dists=[r.tolist() for r in rows] if full_dists else None,
            next_logprobs=nxt.tolist() if full_next else None,
        )

    async def next_token_logprobs(self, prefix_ids, candidates):
        row = torch.log_softmax(self._row(len(prefix_ids)), -1)
        return {c: float(row[c]) for c in candidates}


def make_session(small, large, *, max_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                 prompt: list[int] | None = None) -> Session:
    tok = CharTokenizer()
    models = {r: ModelHandle(r, w, tok, EOS, "chars") for r, w in (("small", small), ("large", large))}
    prompt = prompt if prompt is not None else [1]
    return Session(problem="p", models=models, prompt_ids={"small": list(prompt), "large": list(prompt)},
                   params=GenParams(temperature=temperature, max_tokens=max_tokens), max_tokens=max_tokens, seed=seed)
