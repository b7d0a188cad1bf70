"""The Worker protocol: one model behind one backend, spoken in token ids.

Messages are pydantic models so that they cross a Ray boundary unchanged. Every
backend (transformers, vLLM, a Ray actor wrapping either) implements `Worker`;
policies see nothing else.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenParams(_Msg):
    """How to continue a token sequence (the subset of vLLM's SamplingParams we rely on).

    Strict and finite: a backend must never be asked for ``max_tokens=True`` (lax pydantic
    reads it as 1) or an infinite temperature (NaN probabilities in the sampler).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = disabled")
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, description="top-k logprobs per generated token; 0 = sampled token only")
    sample_logprobs: bool = Field(False, description="each generated token's log-prob under the sampling "
                                  "distribution (temperature, top-k, top-p applied; non-greedy only)")
    stop_below: float | None = Field(None, gt=0.0, le=1.0, description="end (finish 'length') after a token at "
                                     "whose position the model's top-1 probability (its raw distribution, temperature "
                                     "1) is under this: a draft stops where its model doubts itself")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class CallTiming(_Msg):
    """Where one call's time went inside its worker (seconds on the worker's clock).

    ``prefill_s`` and ``decode_s`` are the wall time of the engine passes the call took
    part in (a batched pass counts whole for every row in it: that is how long the call
    waited for it); ``queue_s`` is the rest of its time in the worker: waiting to be
    picked up, and waiting while the engine served other calls' passes. Whatever the
    caller measures beyond these (thread or process hand-offs, the event loop) is
    overhead outside the model. The session adds calls up into a problem's critical path
    (``orchestrator.timing``).
    """

    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def model_s(self) -> float:
        return self.prefill_s + self.decode_s


class Fusion(_Msg):
    """A score call's sampling reads taken from fused rows (Reflective Verification's read).

    With ``Worker.score(..., fuse=Fusion(offset=k, ...))`` over a continuation of n
    tokens, row i (i = 0..n-k) is replaced by the fusion of its log-distribution with
    that of row k + i, and the sampling reads (``sampled``, ``sample_logprobs``,
    ``draws``, ``candidate_logprobs``) are answered from those n - k + 1 fused rows over
    the continuation's first n - k tokens, as if that were the continuation. A draft
    scored twice in one pass (``[draft][probe][draft]``) is verified on the mixture of
    the model's plain and reflective readings inside the worker: no vocabulary-sized
    row crosses the protocol. ``logprobs``, ``top``, ``dists`` and the rest stay plain.
    ``linear``: (1 - alpha) p + alpha r; ``log-linear``: the renormalised p^(1-alpha) r^alpha.
    """

    offset: int = Field(ge=1)
    alpha: float = Field(ge=0.0, le=1.0)
    kind: Literal["linear", "log-linear"] = "linear"


class TokenLogprob(_Msg):
    token_id: int
    logprob: float
    top: dict[int, float] = Field(default_factory=dict)


class Generation(_Msg):
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length", "eos"]
    stop_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    sample_logprobs: list[float] | None = None  # ``GenParams.sample_logprobs``: q(x) of each token, as drawn
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    forward_passes: int = 0
    timing: CallTiming | None = None


class Scores(_Msg):
    """Per continuation token: the model's log-probability given everything before it.

    ``next_logprobs`` is the log-distribution after the last continuation token
    when asked (``full_next=True``): lossless verification needs it for the bonus token.

    ``sampled`` (when ``sample`` params are given) is the model's own token at each
    continuation position and at the position after the last one: the argmax under
    greedy params, a seeded draw from the temperature/top-k/top-p distribution
    otherwise. Token-level policies read their replacement or bonus token from it,
    so it comes from the same forward pass and no vocabulary-sized row crosses the
    protocol.

    Sampling reads (non-greedy ``sample`` only; ``workers.sampling.fill_sample_reads``),
    log-probs of the *sampling* distribution (temperature, top-k, top-p applied):
    ``sample_logprobs`` of each continuation token; ``draws``/``draw_logprobs``: per
    row (continuation positions and the one after), that many further draws when
    asked; ``candidate_logprobs``: of the asked ``candidates`` at each row. Lossless
    speculative sampling reads p and q through these: O(draft length) numbers a round.
    With ``fuse`` (``Fusion``) all of these, ``sampled`` included, come from fused rows.
    """

    logprobs: list[float]
    top: list[dict[int, float]] | None = None
    entropies: list[float] | None = None
    dists: list[list[float]] | None = None
    next_logprobs: list[float] | None = None
    sampled: list[int] | None = None
    sample_logprobs: list[float] | None = None
    draws: list[list[int]] | None = None
    draw_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    timing: CallTiming | None = None


class NextToken(_Msg):
    """The distribution at the position after a prefix, as a judge reads it.

    ``candidates``: log-probabilities of the asked tokens (e.g. the digits 0-9);
    ``top``: the ``top_k`` most likely tokens over the whole vocabulary, most likely
    first (SpecReason's reference reads its score from the argmax and the top-10).
    """

    candidates: dict[int, float] = Field(default_factory=dict)
    top: dict[int, float] = Field(default_factory=dict)
    timing: CallTiming | None = None


class WorkerInfo(_Msg):
    model_id: str
    backend: str
    device: str
    vocab_size: int
    vocab_fingerprint: str
    context_length: int
    eos_token_id: int | None = None
    #: the OS process whose Python runs this model's engine, where it is one the orchestrator may share
    #: (an in-process hf engine: the orchestrator's own); None: a process of the engine's own (vLLM's engine core)
    process: int | None = None


class WorkerStats(_Msg):
    """Counters since the worker started; a run's share is the difference of two snapshots.

    Time: ``clock_s`` since the worker started = ``busy_s`` (serving at least one call)
    + ``idle_s``. ``prefill_s``/``decode_s``: engine time in prefill and decode phases
    (their bookkeeping included), ``forward_s`` the part inside the model's forward
    passes; a backend that cannot see its engine's phases (vLLM) sums its calls' own
    phases, which overlap under batching, and leaves ``forward_s`` 0. ``cpu_s``: CPU time
    of the engine's thread (hf; 0 where the engine runs in other processes): busy time
    beyond it is time the engine had work but no core, or waited for the GIL. ``queue_s``: the
    calls' ``CallTiming.queue_s`` summed.
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    forward_passes: int = 0
    requests: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    clock_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0
    queue_s: float = 0.0
    cpu_s: float = 0.0
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    confidence_stops: int = 0  # generations ended by ``GenParams.stop_below``


#: Token ids as one C int32 buffer (``array('i')``): the orchestrator's token logs and their views.
TokenIds = array


def token_ids(ids: Iterable[int] = ()) -> TokenIds:
    """``ids`` as a token buffer (a copy)."""
    return array("i", ids)


def id_list(ids: Sequence[int]) -> list[int]:
    """Token ids as a list of Python ints, the fast way for a token buffer (``array('i')``)."""
    return ids.tolist() if isinstance(ids, array) else list(ids)


def joined(ids: Sequence[int], more: Sequence[int]) -> TokenIds:
    """``ids`` then ``more`` as a new token buffer: a memcpy of a long log, not a Python loop over it."""
    return (ids if isinstance(ids, array) else token_ids(ids)) + token_ids(more)


@runtime_checkable
class Worker(Protocol):
    """What a policy may ask of a model. All methods are coroutines.

    Token sequences passed in are any ``Sequence[int]``: the orchestrator passes its
    token logs as ``array('i')`` buffers (cheap to slice and to pickle across Ray),
    which a worker reads but never changes.
    """

    async def generate(self, prompt_ids: Sequence[int], params: GenParams) -> Generation: ...

    async def score(
        self,
        prefix_ids: Sequence[int],
        continuation_ids: list[int],
        top_k: int = 0,
        entropies: bool = False,
        full_dists: bool = False,
        full_next: bool = False,
        sample: GenParams | None = None,
        draws: int = 0,
        candidates: list[list[int]] | None = None,
        fuse: Fusion | None = None,
    ) -> Scores: ...

    async def next_token_logprobs(self, prefix_ids: Sequence[int], candidates: list[int], top_k: int = 0) -> NextToken: ...

    async def info(self) -> WorkerInfo: ...

    async def stats(self) -> WorkerStats: ...

    async def close(self) -> None: ...


#: The protocol's model calls whose first argument is a token sequence (a replica set routes them by it),
#: and every call a wrapper forwards (``workers.ray_worker``: one mechanism, no per-method copies).
ROUTED_CALLS = ("generate", "score", "next_token_logprobs")
CALLS = (*ROUTED_CALLS, "info", "stats")


def forwarding(send: str, names: tuple[str, ...] = CALLS):
    """Class decorator: each protocol call ``name`` becomes ``await self.<send>(name, *args, **kwargs)``.

    Wrappers (a Ray actor body, its driver-side client, a replica set) forward the
    protocol without restating its signatures; ``Worker`` above is where they live.
    """
    def make(name: str):
        async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self, send)(name, *args, **kwargs)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"``Worker.{name}``, forwarded."
        return call

    def decorate(cls: type) -> type:
        for name in names:
            setattr(cls, name, make(name))
        return cls

    return decorate


class WorkerError(RuntimeError):
    """A worker could not serve a request (crashed, shut down, bad input)."""


def vocab_fingerprint(tokenizer: Any) -> str:
    """Stable id of a vocabulary (``WorkerInfo.vocab_fingerprint``): token-level policies need equal ones."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
