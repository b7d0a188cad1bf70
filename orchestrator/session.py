"""One request: its models, the reasoning so far, the trace, metrics and events.

Policies extend a session through a few methods (``generate``, ``append``,
``reject``, ``judge_ids``...), so every decision lands in the trace and every
model call in the metrics, whatever the policy.

The reasoning is kept as text: each model sees ``its prompt ids + its encoding of
the text``, so two models with different tokenizers can share a chain of thought
(step-level policies); token-level policies work on ids of a shared vocabulary.
Encoding the same text again yields the same ids, so a model's prefix cache serves
everything it has already seen.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from orchestrator.answer import final_answer
from orchestrator.context import room
from workers.protocol import Generation, GenParams, NextToken, Worker

Role = str


class Segment(BaseModel):
    """A piece of reasoning and how it came to be (the audit trail)."""

    author: Role
    text: str
    tokens: int
    kind: Literal["step", "burst", "probe", "tokens", "answer", "review"] = "step"
    accepted: bool = True
    score: float | None = None
    note: str | None = None


class Event(BaseModel):
    type: Literal["segment", "done"]
    segment: Segment | None = None
    result: Any = None


class Metrics(BaseModel):
    wall_s: float = 0.0
    tokens: dict[Role, int] = Field(default_factory=dict)
    accepted_tokens: dict[Role, int] = Field(default_factory=dict)
    forward_passes: dict[Role, int] = Field(default_factory=dict)
    calls: dict[Role, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    handoffs: int = 0
    finish_reason: str = ""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def add_call(self, role: Role, gen_tokens: int, forward_passes: int, prompt: int, cached: int) -> None:
        self.tokens[role] = self.tokens.get(role, 0) + gen_tokens
        self.forward_passes[role] = self.forward_passes.get(role, 0) + forward_passes
        self.calls[role] = self.calls.get(role, 0) + 1
        self.prompt_tokens += prompt
        self.cached_prompt_tokens += cached


class Result(BaseModel):
    id: str | None = None
    problem: str
    text: str
    answer: str | None
    policy: str
    segments: list[Segment]
    metrics: Metrics

    def summary_row(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "latency_s": round(m.wall_s, 4),
            "tokens_small": m.tokens.get("small", 0),
            "tokens_large": m.tokens.get("large", 0),
            "accepted_tokens_small": m.accepted_tokens.get("small", 0),
            "accepted_tokens_large": m.accepted_tokens.get("large", 0),
            "forward_passes_large": m.forward_passes.get("large", 0),
            "prompt_tokens": m.prompt_tokens,
            "cached_prompt_tokens": m.cached_prompt_tokens,
            "proposed": m.proposed,
            "accepted": m.accepted,
            "handoffs": m.handoffs,
            "finish_reason": m.finish_reason,
        }


@dataclass
class ModelHandle:
    """A worker plus what the orchestrator needs to talk to it in token ids."""

    role: Role
    worker: Worker
    tokenizer: Any
    eos_token_id: int | None = None
    vocab_fingerprint: str = ""
    context_length: int | None = None  # tokens the model attends to (None: unchecked)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Session:
    problem: str
    models: dict[Role, ModelHandle]
    prompt_ids: dict[Role, list[int]]
    params: GenParams  # defaults: sampling settings of the run
    max_tokens: int
    id: str | None = None
    seed: int = 0
    reasoning: str = ""
    segments: list[Segment] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    finished: bool = False
    events: asyncio.Queue | None = None
    _calls: int = 0
    _rng: torch.Generator | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def generator(self) -> torch.Generator:
        """The request's own RNG for policy-side sampling (seeded: runs are reproducible)."""
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(self.seed)
        return self._rng

    # ------------------------------------------------------------ token views

    def ids(self, role: Role, extra: str = "") -> list[int]:
        """Prompt + reasoning (+ extra text) in ``role``'s tokens."""
        h = self.models[role]
        return self.prompt_ids[role] + h.encode(self.reasoning + extra)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.metrics.accepted_tokens.values())

    @property
    def budget_left(self) -> int:
        return max(0, self.max_tokens - self.accepted_tokens)

    # ------------------------------------------------------------ model calls

    def gen_params(self, **overrides: Any) -> GenParams:
        self._calls += 1
        seed = None if self.params.greedy else (self.seed * 1_000_003 + self._calls) % (2**31)
        return self.params.model_copy(update={"seed": seed, **overrides})

    async def generate(self, role: Role, ids: list[int] | None = None, **overrides: Any) -> Generation:
        """Continue the reasoning (or the given ids) with ``role``; metered.

        ``max_tokens`` is capped by the budget and by the room left in the model's context;
        with no room left this raises ``ContextFull`` (the chain ends with "length").
        """
        ids = self.ids(role) if ids is None else ids
        left = room(self.models[role], len(ids))
        overrides.setdefault("max_tokens", self.budget_left)
        overrides["max_tokens"] = max(1, min(overrides["max_tokens"], self.budget_left or 1, left))
        g = await self.models[role].worker.generate(ids, self.gen_params(**overrides))
        self.metrics.add_call(role, len(g.token_ids), g.forward_passes, g.prompt_tokens, g.cached_prompt_tokens)
        return g

    async def score(self, role: Role, prefix: list[int], continuation: list[int], **kw: Any):
        room(self.models[role], len(prefix) + len(continuation), new=0)
        s = await self.models[role].worker.score(prefix, continuation, **kw)
        self.metrics.add_call(role, 0, 1, s.prompt_tokens + len(continuation), s.cached_prompt_tokens)
        return s

    async def next_token_logprobs(self, role: Role, prefix: list[int], candidates: list[int],
                                  top_k: int = 0) -> NextToken:
        room(self.models[role], len(prefix), new=0)
        out = await self.models[role].worker.next_token_logprobs(prefix, candidates, top_k)
        self.metrics.add_call(role, 0, 1, len(prefix), 0)
        return out

    # ------------------------------------------------------------ trace

    def _emit(self, seg: Segment) -> None:
        self.segments.append(seg)
        if self.events is not None:
            self.events.put_nowait(Event(type="segment", segment=seg))

    def append(self, author: Role, text: str, tokens: int, kind: str = "step", score: float | None = None,
               note: str | None = None) -> None:
        """Accept ``text`` into the reasoning.

        An answer in the text does not end the request: whether it does is the
        policy's rule (SpecReason stops on an answer marker; the others run to EOS
        or the budget, as their reference code does).
        """
        self.reasoning += text
        self.metrics.accepted_tokens[author] = self.metrics.accepted_tokens.get(author, 0) + tokens
        self._emit(Segment(author=author, text=text, tokens=tokens, kind=kind, score=score, note=note))

    def reject(self, author: Role, text: str, tokens: int, kind: str = "step", score: float | None = None,
               note: str | None = None) -> None:
        self._emit(Segment(author=author, text=text, tokens=tokens, kind=kind, accepted=False, score=score, note=note))

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.finish_reason = reason

    @property
    def out_of_budget(self) -> bool:
        return self.budget_left <= 0

    def result(self, policy: str) -> Result:
        self.metrics.wall_s = time.perf_counter() - self._t0
        if not self.metrics.finish_reason:
            self.metrics.finish_reason = "budget" if self.out_of_budget else "stopped"
        return Result(
            id=self.id, problem=self.problem, text=self.reasoning, answer=final_answer(self.reasoning),
            policy=policy, segments=self.segments, metrics=self.metrics,
        )
