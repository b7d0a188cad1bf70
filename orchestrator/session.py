"""One request: its models, the reasoning so far, the trace, metrics and events.

The Session keeps the books; policies say what happened. They call models through
it (``generate``, ``score``, ``next_token_logprobs``: metered, capped to the budget
and the context) and report decisions through one path: ``accept`` (a model's
generation or inserted text), ``accept_tokens`` (token-level policies), ``reject``
and ``tally`` (proposals and handoffs), ``finish``. Trace, metrics and events stay
consistent whatever the policy.

The reasoning is a token log per model (``orchestrator.token_log``): each model's
prompt ids, then the reasoning in its own ids, its own output appended as written;
only text from a model with another vocabulary is tokenized, a boundary window at
a time. Text is kept as the pieces that were accepted. Per-step work is O(step),
independent of how long the chain is, and each model's prefix cache serves all it
has seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, Field

from orchestrator.answer import final_answer
from orchestrator.context import room
from orchestrator.timing import CallRecord, ProblemTime, problem_time
from orchestrator.token_log import IncrementalText, Piece, TokenIds, TokenLog
from workers.protocol import Generation, GenParams, NextToken, Worker

Role = str
T = TypeVar("T")


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
    time: ProblemTime | None = None  # where the wall time went (``orchestrator.timing``), set with the result

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
            "critical_path_s": round(m.time.critical_path_s, 4) if m.time else None,
            "efficiency": round(m.time.efficiency, 4) if m.time and m.time.efficiency is not None else None,
            "time": m.time.model_dump() if m.time else None,
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
    process: int | None = None  # where its engine's Python runs, if in a process it may share (``WorkerInfo``)

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
    segments: list[Segment] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    finished: bool = False
    events: asyncio.Queue | None = None
    #: Positions in the large model's log of tokens that replaced a rejected draft token (token-level
    #: policies): online adaptation trains the draft there (``orchestrator.online``).
    draft_misses: list[int] = field(default_factory=list)
    _calls: int = 0
    _rng: torch.Generator | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self._timeline: list[CallRecord] = []  # every model call, for the critical path
        self._logs = {role: TokenLog(h, self.prompt_ids[role]) for role, h in self.models.items()}
        self._pieces: list[str] = []
        self._eos = {h.eos_token_id for h in self.models.values() if h.eos_token_id is not None}
        self._detok: IncrementalText | None = None  # the text of tokens accepted by token-level policies

    def generator(self) -> torch.Generator:
        """The request's own RNG for policy-side sampling (seeded: runs are reproducible)."""
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(self.seed)
        return self._rng

    # ------------------------------------------------------------ token views

    @property
    def reasoning(self) -> str:
        """The reasoning so far (joined on demand: policies read pieces, not the whole)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def ids(self, role: Role) -> list[int]:
        """Prompt + reasoning in ``role``'s tokens (a copy: the log itself changes only through ``accept``)."""
        return list(self._logs[role].ids)

    def log(self, role: Role) -> TokenIds:
        """``role``'s token log as it is now, not a copy: read it, pass it to a call, never change it.

        Accepting text replaces the log with a new buffer (this one stays as it
        was), so read it again after that; ``accept_tokens`` grows it in place
        (token-level policies, whose round's calls have returned by then, pass it
        to every round's calls without copying 32k ids).
        """
        return self._logs[role].ids

    def view(self, role: Role, *pieces: Piece) -> TokenIds:
        """What ``role`` would see with ``pieces`` accepted (a judge's context, a look-ahead draft's prompt)."""
        return self._logs[role].view(*pieces)

    def split(self, role: Role, *pieces: Piece) -> tuple[TokenIds, list[int]]:
        """``view`` as (ids ``role`` has already seen, ids that are new): the prefix comes from its cache."""
        log = self._logs[role]
        keep, new = log.split(*pieces)
        return log.ids[:keep], new

    @property
    def accepted_tokens(self) -> int:
        return sum(self.metrics.accepted_tokens.values())

    @property
    def budget_left(self) -> int:
        return max(0, self.max_tokens - self.accepted_tokens)

    @property
    def out_of_budget(self) -> bool:
        return self.budget_left <= 0

    # ------------------------------------------------------------ model calls

    def gen_params(self, **overrides: Any) -> GenParams:
        self._calls += 1
        seed = None if self.params.greedy else (self.seed * 1_000_003 + self._calls) % (2**31)
        return self.params.model_copy(update={"seed": seed, **overrides})

    async def generate(self, role: Role, ids: Sequence[int] | None = None, **overrides: Any) -> Generation:
        """Continue the reasoning (or the given ids) with ``role``; metered.

        ``max_tokens`` is capped by the budget and by the room left in the model's context;
        with no room left this raises ``ContextFull`` (the chain ends with "length").
        """
        ids = self._logs[role].ids if ids is None else ids
        left = room(self.models[role], len(ids))
        overrides.setdefault("max_tokens", self.budget_left)
        overrides["max_tokens"] = max(1, min(overrides["max_tokens"], self.budget_left or 1, left))
        g = await self._timed(role, self.models[role].worker.generate(ids, self.gen_params(**overrides)))
        self.metrics.add_call(role, len(g.token_ids), g.forward_passes, g.prompt_tokens, g.cached_prompt_tokens)
        return g

    async def score(self, role: Role, prefix: list[int], continuation: list[int], **kw: Any):
        room(self.models[role], len(prefix) + len(continuation), new=0)
        s = await self._timed(role, self.models[role].worker.score(prefix, continuation, **kw))
        self.metrics.add_call(role, 0, 1, s.prompt_tokens + len(continuation), s.cached_prompt_tokens)
        return s

    async def next_token_logprobs(self, role: Role, prefix: list[int], candidates: list[int],
                                  top_k: int = 0) -> NextToken:
        room(self.models[role], len(prefix), new=0)
        out = await self._timed(role, self.models[role].worker.next_token_logprobs(prefix, candidates, top_k))
        self.metrics.add_call(role, 0, 1, len(prefix), 0)
        return out

    async def _timed(self, role: Role, call: Awaitable[T]) -> T:
        """Await a model call, putting it on the problem's timeline (wall interval and the worker's timing)."""
        start = time.perf_counter()
        out = await call
        self._timeline.append(CallRecord(role, start, time.perf_counter(), getattr(out, "timing", None)))
        return out

    # ------------------------------------------------------------ decisions: the books

    def _emit(self, seg: Segment) -> None:
        self.segments.append(seg)
        if self.events is not None:
            self.events.put_nowait(Event(type="segment", segment=seg))

    def piece(self, author: Role, g: Generation, then: str = "", text: str | None = None) -> Piece:
        """``g``'s text and ``then`` (e.g. the delimiter a stop string removed) with the ids ``author`` wrote.

        ``text``: what the generation stands for when the policy edited it; its ids then no longer apply.
        A final EOS is not part of the reasoning (it ends the request), so it is left out.
        """
        if text is not None and text != g.text + then:
            return Piece(text)
        ids = g.token_ids[:-1] if g.finish_reason == "eos" and g.token_ids and g.token_ids[-1] in self._eos else g.token_ids
        return Piece(g.text + then, ids, self.models[author].vocab_fingerprint)

    def accept(self, author: Role, g: Generation, *, then: str = "", text: str | None = None, kind: str = "step",
               score: float | None = None, note: str | None = None) -> None:
        """Accept ``author``'s generation ``g`` (see ``piece``) into the reasoning; EOS ends the request.

        Its ids go into every log of its vocabulary as written; other logs tokenize
        its text at the boundary; its ids count against the budget. An answer in
        the text does not end the request: that is a policy's rule (SpecReason
        stops on an answer marker; the others run to EOS or the budget, as their
        reference code does).
        """
        piece = self.piece(author, g, then, text)
        for log in self._logs.values():
            log.append(piece)
        self._record(author, piece.text, len(g.token_ids), kind, score, note)
        if g.finish_reason == "eos":
            self.finish("eos")

    def insert(self, author: Role, text: str, *, kind: str = "review", note: str | None = None) -> None:
        """Text a policy puts into the reasoning on ``author``'s behalf (a review prompt): no tokens written."""
        for log in self._logs.values():
            log.append(Piece(text))
        self._record(author, text, 0, kind, None, note)

    def accept_tokens(self, author: Role, tokens: list[int], *, scored: bool = False,
                      replaces_draft: bool = False) -> None:
        """Token-level policies (one shared vocabulary): append ids to every log; EOS among them ends the request.

        ``scored``: the ids came out of a scoring pass, not a generate call, so they
        are counted here as written by ``author``. ``replaces_draft``: the first of them
        replaces a draft token the policy rejected; its position joins ``draft_misses``.
        """
        if replaces_draft:
            self.draft_misses.append(len(self._logs["large" if "large" in self._logs else next(iter(self._logs))].ids))
        for log in self._logs.values():
            log.extend(tokens)
        if self._detok is None:
            role = next(iter(self._logs))
            self._detok = IncrementalText(self.models[role], self._logs[role].n_prompt)
        text = self._detok.advance(next(iter(self._logs.values())).ids)
        if scored:
            self.metrics.tokens[author] = self.metrics.tokens.get(author, 0) + len(tokens)
        self._record(author, text, len(tokens), "tokens", None, None)
        if self._eos.intersection(tokens):
            self.finish("eos")

    def _record(self, author: Role, text: str, tokens: int, kind: str, score: float | None, note: str | None) -> None:
        self._pieces.append(text)
        self.metrics.accepted_tokens[author] = self.metrics.accepted_tokens.get(author, 0) + tokens
        self._emit(Segment(author=author, text=text, tokens=tokens, kind=kind, score=score, note=note))

    def reject(self, author: Role, text: str, tokens: int, kind: str = "step", score: float | None = None,
               note: str | None = None) -> None:
        """Record a proposal that does not join the reasoning (the trace keeps it)."""
        self._emit(Segment(author=author, text=text, tokens=tokens, kind=kind, accepted=False, score=score, note=note))

    def tally(self, proposed: int = 0, accepted: int = 0, handoffs: int = 0) -> None:
        """Count a policy's proposals (steps, probes or draft tokens), how many were kept, and handoffs."""
        self.metrics.proposed += proposed
        self.metrics.accepted += accepted
        self.metrics.handoffs += handoffs

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.finish_reason = reason

    def result(self, policy: str) -> Result:
        self.metrics.wall_s = time.perf_counter() - self._t0
        self.metrics.time = problem_time(self._timeline, self.metrics.wall_s)
        if not self.metrics.finish_reason:
            self.metrics.finish_reason = "budget" if self.out_of_budget else "stopped"
        text = self.reasoning
        return Result(
            id=self.id, problem=self.problem, text=text, answer=final_answer(text),
            policy=policy, segments=self.segments, metrics=self.metrics,
        )
