"""The transformers backend: any causal LM on CPU or GPU, with KV reuse and batching.

One engine thread owns the model. Requests from any number of coroutines are
queued to it; it serves them in shared forward passes:

- **prefill batch**: every newly arrived request (generate, score, judge) is
  matched against the prefix cache, and only its uncached tokens are fed, all
  requests in one padded forward pass (left padding inside the cache and the new
  tokens, per-row position ids);
- **decode rounds**: active generations are stacked into one batched KV cache and
  decoded together for up to ``round_steps`` steps, or until all stop; new
  arrivals join at the next round. The batched cache is kept from round to round
  (a prefill's batch goes on decoding as it is) and changes in place: a row that
  leaves frees its slot, a row that joins is copied into a free one (or one added
  after the last), so a long generation is not copied when others come and go;
  the batch is rebuilt only when holes or free slots waste too much of it.
  A row that finishes is answered at once (its KV sliced out of the round's
  cache), not at the round's end: its caller's next request is queued while
  the others decode, and it ends the round after ``round_steps``.

Finished sequences leave their KV in the prefix cache, so the next call of the
same session (the next reasoning step, a judge prompt over the same context)
pays only for its new tokens. A call served alone writes on in the buffer of
the entry it hit, in place, when no live request writes there (the entries it
overwrites are dropped): a chain's calls share one buffer instead of copying
the whole context once per call.
"""

from __future__ import annotations

import asyncio
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

from workers.hf_fast_forward import FastForward
from workers.prefix_cache import KV, PrefixCache, as_ids, block_hashes
from workers.sampling import check_sample_reads, doubts, draw, fill_sample_reads, sampling_probs
from workers.timing import BusyClock, CallClock, PhaseClock
from workers.protocol import (
    CallTiming, Fusion, Generation, GenParams, NextToken, Scores, TokenLogprob, WorkerError, WorkerInfo, WorkerStats,
    vocab_fingerprint,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: How long ``close`` waits for the engine thread: a forward pass is not interruptible, and shutdown
#: must not wait for a long one (the daemon thread exits when the pass returns).
CLOSE_TIMEOUT_S = 2.0


def load_tokenizer(path: str) -> Any:
    return AutoTokenizer.from_pretrained(path)


class GrowingLayer(DynamicLayer):
    """A cache layer that writes new positions into spare room instead of concatenating.

    ``DynamicLayer`` concatenates on every update, copying the whole cache for each
    decoded token (O(context) per token). This layer keeps a buffer with
    ``HEADROOM`` spare positions, doubling it when full, and exposes the filled part
    as a view, so a decode step costs O(new positions). Rows work the same way: the
    buffer may hold more rows than are in use, so a batch that gains rows
    (``add_rows``) copies nothing while there is room. Cached KV handed to it is
    copied once into its own buffer, unless the caller lets it ``adopt`` the
    buffer that KV is a leading view of: then it writes on from there, in place
    (the caller has made sure nothing else reads or writes past that point).
    """

    HEADROOM = 256

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._n = 0
        b, n, add = key_states.shape[0], self._n, key_states.shape[-2]
        if self._k is None or n + add > self._k.shape[-2]:
            rows = b if self._k is None else self._k.shape[0]
            self._regrow(rows, max(n + add + self.HEADROOM, 2 * n), key_states)
        self._k[:b, :, n : n + add] = key_states
        self._v[:b, :, n : n + add] = value_states
        self._n = n + add
        self.keys, self.values = self._k[:b, :, : self._n], self._v[:b, :, : self._n]
        return self.keys, self.values

    def add_rows(self, extra: int) -> None:
        """``extra`` more rows after those in use, their positions unset (the caller fills the filled part).

        The buffer's rows double when full, so a batch that keeps gaining rows is copied O(log) times.
        """
        b = self.keys.shape[0]
        if b + extra > self._k.shape[0]:
            self._regrow(max(b + extra, 2 * b), self._k.shape[-2], self.keys)
        self.keys, self.values = self._k[: b + extra, :, : self._n], self._v[: b + extra, :, : self._n]

    def _regrow(self, rows: int, room: int, like: torch.Tensor) -> None:
        """A new buffer of ``rows`` x ``room``, holding what the rows in use have filled."""
        shape = (rows, like.shape[1], room, like.shape[-1])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self._k is not None and self._n:
            b = self.keys.shape[0]
            k[:b, :, : self._n], v[:b, :, : self._n] = self.keys, self.values
        self._k, self._v = k, v

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Go on in the buffer ``keys`` / ``values`` are leading views of, without copying; False if they are not."""
        bk, bv = _buffer_of(keys), _buffer_of(values)
        if bk is None or bv is None:
            return False
        self.lazy_initialization(keys, values)
        self._k, self._v, self._n = bk, bv, keys.shape[-2]
        self.keys, self.values = keys, values
        return True


def _buffer_of(view: torch.Tensor) -> torch.Tensor | None:
    """The whole cache buffer (batch, heads, room, dim) that ``view`` is the first positions of, or None.

    Read from the view's storage and strides: tensors made under ``torch.inference_mode`` keep no ``_base``.
    """
    if view.dim() != 4 or view.storage_offset() != 0:
        return None
    b, h, _, d = view.shape
    s0, s1, s2, s3 = view.stride()
    if s3 != 1 or s2 != d or s1 % d or s0 != h * s1:
        return None
    room = s1 // d
    if view.untyped_storage().nbytes() != b * h * room * d * view.element_size():
        return None
    return view.as_strided((b, h, room, d), view.stride())


def growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None, adopt: bool = False) -> Cache:
    """A cache of ``GrowingLayer``s, filled with ``layers`` when given: copied, or with ``adopt`` their buffers
    taken over in place where they are leading views of one (see ``GrowingLayer.adopt``)."""
    if layers is None:
        return Cache(layer_class_to_replicate=GrowingLayer)
    cache = Cache(layers=[GrowingLayer() for _ in layers])
    for layer, (k, v) in zip(cache.layers, layers):
        if not (adopt and layer.adopt(k, v)):
            layer.update(k, v)
    return cache


def _buffers(ref: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised K and V buffers like ``ref``'s for ``rows`` rows of ``width`` positions and ``HEADROOM`` more.

    The caller fills the first ``width`` positions of every row (finite values: a masked position is still
    multiplied by its zero weight); the cache's own updates write the rest before anything reads them.
    """
    shape = (rows, ref.shape[1], width + GrowingLayer.HEADROOM, ref.shape[3])
    return ref.new_empty(shape), ref.new_empty(shape)


def _adopted(buffers: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> Cache:
    """A cache that writes on in ``buffers`` (one pair per layer) after their first ``width`` positions."""
    return growing_cache([(k[:, :, :width], v[:, :, :width]) for k, v in buffers], adopt=True)


def stack_kv(kvs: list[KV | None], width: int, adopt: bool = False) -> Cache:
    """Rows' caches left-padded to ``width`` in one batched cache (empty when nothing is cached).

    Each row is copied once, into the batched cache's own buffer (``write_row``); a single row may
    instead ``adopt`` the buffer its cache is a view of.
    """
    ref = next((kv for kv in kvs if kv is not None), None)
    if ref is None or width == 0:
        return growing_cache()
    if len(kvs) == 1 and kvs[0][0][0].shape[2] == width:
        return growing_cache(kvs[0], adopt=adopt)
    buffers = []
    for layer, (k0, _) in enumerate(ref):
        keys, values = _buffers(k0, len(kvs), width)
        for i, kv in enumerate(kvs):
            write_row(keys, values, i, None if kv is None else kv[layer], width)
        buffers.append((keys, values))
    return _adopted(buffers, width)


def write_row(keys: torch.Tensor, values: torch.Tensor, i: int, kv: tuple[torch.Tensor, torch.Tensor] | None,
              width: int) -> None:
    """Row ``i`` of a batched layer: one row's ``kv`` (None: nothing cached) right-aligned to end at ``width``,
    zeros before it (finite: a masked position is still multiplied by its zero weight)."""
    p = 0 if kv is None else kv[0].shape[2]
    keys[i, :, : width - p] = 0
    values[i, :, : width - p] = 0
    if p:
        keys[i, :, width - p : width] = kv[0][0]
        values[i, :, width - p : width] = kv[1][0]


def gather_kv(cache: Cache, rows: list[int], start: int) -> Cache:
    """Rows ``rows`` of a batched cache from position ``start`` on, copied once into a cache of their own."""
    width = cache.layers[0].keys.shape[2] - start
    buffers = []
    for lay in cache.layers:
        keys, values = _buffers(lay.keys, len(rows), width)
        for j, i in enumerate(rows):
            keys[j, :, :width] = lay.keys[i, :, start:]
            values[j, :, :width] = lay.values[i, :, start:]
        buffers.append((keys, values))
    return _adopted(buffers, width)


def unstack_kv(cache: Cache, mask: torch.Tensor, rows: list[int] | None = None) -> list[KV]:
    """Rows' own caches out of a batched one: the positions each mask row keeps (padding and holes dropped).

    ``rows``: the cache rows to take, one per mask row (default: all of them, in order).
    """
    layers = cache.layers
    picked = rows if rows is not None else range(mask.shape[0])
    if layers[0].keys.shape[0] == 1 and bool(mask.all()):
        return [[(lay.keys, lay.values) for lay in layers]]
    out = []
    for m, i in zip(mask, picked):
        keep = m.bool().to(layers[0].keys.device)
        out.append([(lay.keys[i : i + 1][:, :, keep], lay.values[i : i + 1][:, :, keep]) for lay in layers])
    return out


@dataclass(eq=False)
class _Request:
    kind: Literal["generate", "score", "next", "swap"]
    ids: np.ndarray  # int64: the prompt (a score's prefix, then its continuation)
    future: asyncio.Future | None
    loop: asyncio.AbstractEventLoop | None
    params: GenParams | None = None
    n_prefix: int = 0
    top_k: int = 0
    entropies: bool = False
    full_dists: bool = False
    full_next: bool = False
    sample: GenParams | None = None
    draws: int = 0
    row_candidates: list[list[int]] | None = None  # a score's candidates per row (``Worker.score``)
    fuse: Fusion | None = None
    candidates: list[int] = field(default_factory=list)
    payload: Any = None  # a swap's new model
    # runtime state
    kv: KV | None = None
    hashes: list[int] | None = None  # the prefix cache's block hashes of ``ids``
    cached: int = 0
    source: int | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)
    rng: torch.Generator | None = None
    forward_passes: int = 0
    done: bool = False
    finish: tuple[str, str | None] = ("length", None)
    cancelled: bool = False
    resolved: bool = False
    result: Any = None
    clock: CallClock = field(default_factory=CallClock)  # queue, prefill and decode time of this call

    @property
    def live(self) -> bool:
        """Still to be answered: while live, a request may write into its KV buffer."""
        return not (self.resolved or self.cancelled)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        self.resolved = True
        if self.loop is None:  # served synchronously (run_sync): the caller reads .result
            if error is not None:
                raise error
            self.result = value
            return

        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(_set)


@dataclass(eq=False)
class _Batch:
    """Rows decoding together: one batched cache, its padding-and-holes mask, each row's length.

    Kept by the engine from one round to the next (``HFWorker._hold``), so a long request is not
    re-stacked (copied whole) every round, nor when other rows come and go: a row that leaves frees
    its slot (None), a row that joins is copied into a free slot (``HFWorker._joined``); only when
    that cannot be done, or free slots and holes waste too much of the cache, is it rebuilt.
    """

    rows: list[_Request | None]  # the cache's rows in order; None: a free slot
    cache: Cache
    mask: torch.Tensor
    lengths: torch.Tensor

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def free(self, i: int) -> None:
        self.rows[i] = None
        self.mask[i] = 0


class HFWorker:
    """Worker protocol on a transformers model."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        kv_cache_tokens: int = 200_000,
        max_batch_size: int = 64,
        round_steps: int = 16,
        speculative: Any = None,
        threads: int | None = None,
        model: Any = None,
        fast_forward: bool = True,
    ):
        path = Path(model_path)
        if not path.exists() and (model_path.startswith((".", "/")) or model_path.count("/") != 1):
            raise FileNotFoundError(f"model folder {model_path} does not exist")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch_dtype = _DTYPES.get(dtype, torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        # ``model``: one built in memory from another worker's weights (a quantized copy, a self-draft),
        # served under ``model_path``'s tokenizer without loading the folder's weights again
        self.model = model if model is not None else (
            AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self.device).eval())
        self.fast_forward = fast_forward
        self._fast = FastForward.build(self.model) if fast_forward else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self.context_length: int = getattr(self.model.config, "max_position_embeddings", 2048)
        self.cache = PrefixCache(kv_cache_tokens)
        self.max_batch_size = max_batch_size
        self.round_steps = round_steps
        self.threads = threads
        self._stats = WorkerStats()
        self._busy = BusyClock()
        self._phases = PhaseClock("prefill", "decode")
        self._cpu_seen = 0.0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pending: set[_Request] = set()  # submitted, not answered yet: failed by close
        self._pieces: dict[int, str] = {}  # token id -> its text alone (the stop-string pre-check)
        self._held: _Batch | None = None  # the last round's batch, kept while its rows go on together
        self._writers: dict[int, _Request] = {}  # a KV buffer's address -> the request writing into it
        self.speculator = None
        if speculative is not None and getattr(speculative, "method", None):
            from workers.hf_speculation import make_speculator

            self.speculator = make_speculator(speculative, self)

    def _eos_ids(self) -> set[int]:
        ids = set()
        cfg = self.model.generation_config
        for src in (cfg.eos_token_id if cfg is not None else None, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        return ids

    # ---------------------------------------------------------------- protocol

    async def generate(self, prompt_ids: Sequence[int], params: GenParams) -> Generation:
        if not prompt_ids:
            raise WorkerError("generate needs a non-empty prompt")
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise WorkerError(f"a prompt of {len(prompt_ids)} tokens leaves no room to generate in the model's "
                              f"context of {self.context_length} tokens")
        if params.max_tokens > room:  # stop at the end of the context ("length"), as vLLM does
            params = params.model_copy(update={"max_tokens": room})
        req = await self._submit(_Request("generate", as_ids(prompt_ids), *self._future(), params=params))
        return req

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
    ) -> Scores:
        if not prefix_ids:
            raise WorkerError("score needs a non-empty prefix")
        self._check_fits(len(prefix_ids) + len(continuation_ids), "score")
        check_sample_reads(len(continuation_ids), sample, draws, candidates, len(self.tokenizer), fuse)
        req = _Request(
            "score", np.concatenate([as_ids(prefix_ids), as_ids(continuation_ids)]), *self._future(),
            n_prefix=len(prefix_ids), top_k=top_k, entropies=entropies, full_dists=full_dists, full_next=full_next,
            sample=sample, draws=draws, row_candidates=candidates, fuse=fuse,
        )
        return await self._submit(req)

    async def next_token_logprobs(self, prefix_ids: Sequence[int], candidates: list[int], top_k: int = 0) -> NextToken:
        if not prefix_ids:
            raise WorkerError("next_token_logprobs needs a non-empty prefix")
        self._check_fits(len(prefix_ids), "next_token_logprobs")
        req = _Request("next", as_ids(prefix_ids), *self._future(), n_prefix=len(prefix_ids),
                       candidates=list(candidates), top_k=top_k)
        return await self._submit(req)

    async def info(self) -> WorkerInfo:
        return WorkerInfo(
            model_id=self.model_path,
            backend="hf",
            device=str(self.device),
            vocab_size=len(self.tokenizer),
            vocab_fingerprint=vocab_fingerprint(self.tokenizer),
            context_length=self.context_length,
            eos_token_id=min(self.eos_ids) if self.eos_ids else None,
            process=os.getpid(),
        )

    async def stats(self) -> WorkerStats:
        busy, idle, clock = self._busy.read()
        phases = {f"{phase}_s": spent for phase, spent in self._phases.read().items()}
        return self._stats.model_copy(update={"busy_s": busy, "idle_s": idle, "clock_s": clock,
                                              "cpu_s": self._engine_cpu(), **phases})

    def _engine_cpu(self) -> float:
        """CPU seconds of the engine thread so far (its own CPU clock, read from this thread; the last
        reading once the thread is gone)."""
        thread = self._thread
        if thread is not None and thread.ident is not None:
            try:
                self._cpu_seen = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # the thread has exited, or no per-thread clocks here
                pass
        return self._cpu_seen

    async def swap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Serve with ``model`` (same architecture and vocabulary) from now on; returns the model it replaces.

        Atomic between engine rounds: requests already admitted finish on the old
        weights, nothing new is admitted while the swap waits for them, and the prefix
        cache (KV computed by the old weights) is dropped with the old model, so no
        request ever mixes the two. Online draft adaptation swaps its distilled draft
        in this way (``orchestrator.online``).
        """
        if model.config.vocab_size != self.model.config.vocab_size:
            raise WorkerError(f"swap_model: vocabulary {model.config.vocab_size} differs from the served model's "
                              f"{self.model.config.vocab_size}")
        model = model.to(self.device).eval()
        return await self._submit(_Request("swap", as_ids([]), *self._future(), payload=model))

    async def close(self) -> None:
        """Stop the engine and fail what is pending, within about ``CLOSE_TIMEOUT_S`` whatever it is doing.

        The engine stops between forward passes; one still running after the timeout (a long
        prefill) is not waited for: the thread is a daemon and exits when the pass returns.
        """
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join, CLOSE_TIMEOUT_S)
        for req in list(self._pending):
            req.resolve(error=WorkerError("worker closed"))
        if thread is None or not thread.is_alive():  # else the engine may still write it: it clears it on exit
            self.cache.clear()

    # ---------------------------------------------------------------- plumbing

    @staticmethod
    def _future() -> tuple[asyncio.Future, asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        return loop.create_future(), loop

    async def _submit(self, req: _Request) -> Any:
        if self._closed:
            raise WorkerError("worker is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._engine, name=f"hf-engine:{self.model_path}", daemon=True)
            self._thread.start()
        self._queue.put(req)
        self._pending.add(req)
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        finally:
            self._pending.discard(req)

    def _check_fits(self, tokens: int, what: str) -> None:
        """The last line of defence: a pass past the context would be garbage (or fail deep in the model)."""
        if tokens > self.context_length:
            raise WorkerError(f"{what} over {tokens} tokens exceeds the model's context of {self.context_length}")

    def _engine(self) -> None:
        if self.threads:  # OpenMP's thread count is per calling thread: this sets it for this engine only
            torch.set_num_threads(self.threads)
        self._busy.enter()  # busy while the engine runs, except while it blocks on an empty queue
        try:
            self._serve()
        finally:
            self._busy.leave()
            self._held = None
            if self._closed:
                self.cache.clear()

    def _serve(self) -> None:
        """The engine loop: batches of arrivals prefilled, then decode rounds, until the worker is closed."""
        active: list[_Request] = []
        swaps: list[_Request] = []  # waiting for the active rows to finish on the old weights
        with torch.inference_mode():
            while not self._closed:
                if swaps and not active:
                    self._apply_swaps(swaps)
                    swaps = []
                incoming: list[_Request] = []
                if not active:
                    self._busy.leave()
                    item = self._queue.get()  # blocks: no busy loop when idle
                    self._busy.enter()
                    if item is None:
                        return
                    incoming.append(item)
                while not swaps and len(incoming) + len(active) < self.max_batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._fail(active + incoming, WorkerError("worker closed"))
                        return
                    incoming.append(item)
                incoming = [r for r in incoming if not r.cancelled]
                if any(r.kind == "swap" for r in incoming):
                    swaps += [r for r in incoming if r.kind == "swap"]
                    incoming = [r for r in incoming if r.kind != "swap"]
                self._phases.start("prefill")
                if incoming:
                    try:
                        active.extend(self._prefill(incoming))
                    except Exception as e:  # a bad batch fails its requests, the engine goes on
                        self._fail(incoming, WorkerError(f"prefill failed: {e!r}"))
                self._phases.start("decode")
                active = [r for r in active if not r.cancelled]
                if active:
                    try:
                        active = self._decode_round(active)
                    except Exception as e:
                        self._fail(active, WorkerError(f"decode failed: {e!r}"))
                        active = []
                self._phases.stop()
        self._fail(active, WorkerError("worker closed"))

    def _apply_swaps(self, swaps: list[_Request]) -> None:
        """Install each swap's model in turn (no request is active), answering each with the model it replaced."""
        for r in swaps:
            old, self.model = self.model, r.payload
            self._fast = FastForward.build(self.model) if self.fast_forward else None
            self.cache.clear()
            r.resolve(old)

    @staticmethod
    def _fail(reqs: list[_Request], error: BaseException) -> None:
        for r in reqs:
            r.resolve(error=error)

    # ---------------------------------------------------------------- forward

    def _forward(self, rows: list[tuple[KV | None, list[int]]], keep: list[int],
                 adopt: bool = False) -> tuple[list[torch.Tensor], list[KV], _Batch]:
        """One padded forward over rows of (cached KV, new tokens).

        Returns per row the logits of its last ``keep[i]`` new tokens (the positions
        its request reads: one for a generation, the continuation for a score), its
        updated KV, and the pass's batch (rows unset), which can go on decoding as
        it is. Logits are computed for those positions only: over a long uncached
        prompt the full ``positions x vocabulary`` matrix would not fit. ``adopt``:
        a single row writes on in its cached KV's buffer (``_claim_hit_buffer``).
        """
        pasts = [0 if kv is None else kv[0][0].shape[2] for kv, _ in rows]
        news = [len(ids) for _, ids in rows]
        P, N, B = max(pasts), max(news), len(rows)
        input_ids = torch.full((B, N), self.pad_id, dtype=torch.long)
        positions = torch.zeros((B, N), dtype=torch.long)
        mask = torch.zeros((B, P + N), dtype=torch.long)
        for i, ((_, ids), p, n) in enumerate(zip(rows, pasts, news)):
            input_ids[i, N - n :] = torch.from_numpy(ids)
            positions[i, N - n :] = torch.arange(p, p + n)
            mask[i, P - p : P] = 1
            mask[i, P + N - n :] = 1
        cache = stack_kv([kv for kv, _ in rows], P, adopt=adopt)
        k = max(keep)  # rows are right-aligned: the last k positions cover every row's reads
        logits = self._run_model(input_ids, mask, positions, cache, k)
        batch = _Batch([], cache, mask, torch.tensor(pasts) + torch.tensor(news))
        return [logits[i, k - m :] for i, m in enumerate(keep)], unstack_kv(cache, mask), batch

    def _run_model(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache,
                   keep: int = 0) -> torch.Tensor:
        """One forward pass (float logits of the last ``keep`` positions, all when 0); ``cache`` grows in place.

        The lean runner (``workers.hf_fast_forward``) where it covers the model, transformers' forward otherwise.
        """
        dev = self.device
        args = (input_ids.to(dev), mask.to(dev), positions.to(dev))
        t0 = time.perf_counter()
        if self._fast is not None:
            logits = self._fast(*args, cache, keep)
        else:
            logits = self.model(input_ids=args[0], attention_mask=args[1], position_ids=args[2], past_key_values=cache,
                                use_cache=True, logits_to_keep=keep).logits
        self._stats.forward_s += time.perf_counter() - t0
        self._stats.forward_passes += 1
        return logits.float()

    # ---------------------------------------------------------------- prefill

    def _prefill(self, reqs: list[_Request]) -> list[_Request]:
        t0 = time.perf_counter()
        rows, keep = [], []
        for r in reqs:
            # the last prompt token (or, for scoring, the last prefix token) must be fed to get its logits
            need_from = (r.n_prefix if r.kind == "score" else len(r.ids)) - 1
            r.hashes = block_hashes(r.ids)  # for the lookup, this pass's entry and, extended, the finished one's
            cached, kv, eid = self.cache.lookup(r.ids, r.hashes)
            cached = min(cached, need_from)
            if kv is not None and cached < kv[0][0].shape[2]:
                kv = [(k[:, :, :cached], v[:, :, :cached]) for k, v in kv] if cached > 0 else None
            r.kv, r.cached, r.source = kv, cached, eid
            rows.append((kv, r.ids[cached:]))
            keep.append(len(r.ids) - r.n_prefix + 1 if r.kind == "score" else 1)
            self._stats.requests += 1
            self._stats.prompt_tokens += len(r.ids) if r.kind != "score" else r.n_prefix
            self._stats.cached_prompt_tokens += cached
        adopt = len(reqs) == 1 and self._claim_hit_buffer(reqs[0])
        logits, kvs, batch = self._forward(rows, keep, adopt=adopt)
        if len(reqs) == 1:  # its buffer holds the entry put below and, decoding, the tokens after it
            self._writers[batch.cache.layers[0].keys.data_ptr()] = reqs[0]
        still_active = []
        for r, lg, kv in zip(reqs, logits, kvs):
            r.kv = kv
            r.forward_passes += 1
            r.source = self.cache.put(r.ids, kv, replaces=r.source, hashes=r.hashes)  # what _finish's replaces
            r.clock.prefill_s += time.perf_counter() - t0  # the batch's pass and bookkeeping up to this row's answer
            if r.kind == "next":
                lp = torch.log_softmax(lg[-1].float(), -1)
                top = {}
                if r.top_k:
                    vals, idx = lp.topk(min(r.top_k, lp.shape[-1]))
                    top = dict(zip(idx.tolist(), vals.tolist()))
                r.resolve(NextToken(candidates={c: float(lp[c]) for c in r.candidates}, top=top,
                                    timing=self._timing(r)))
            elif r.kind == "score":
                r.resolve(self._scores(r, lg))
            else:
                r.rng = self._rng(r.params)
                self._accept_token(r, lg[-1])
                if r.done:
                    self._finish(r)
                else:
                    still_active.append(r)
        if self._held is None and still_active:  # the pass's batch goes on decoding, answered rows' slots free
            batch.rows, going_on = list(reqs), set(still_active)
            for i, r in enumerate(reqs):
                if r not in going_on:
                    batch.free(i)
            self._hold(batch)
        return still_active

    def _claim_hit_buffer(self, r: _Request) -> bool:
        """Let ``r`` (a lone prefill row) write on in the buffer of the cache entry it hit, in place, if it may.

        Copying the hit into a new buffer costs O(context) per call (at a few hundred tokens, as much as
        the forward pass of a short verification), yet most calls extend the state the previous call of
        the same chain left. The buffer is taken over when no live request writes into it; the cached
        entries that reach past ``r``'s start in it are dropped, since ``r`` overwrites those positions
        (what they hold up to the start stays valid, and ``r``'s own entry covers it). Returns whether it may.
        """
        self._writers = {ptr: w for ptr, w in self._writers.items() if w.live}
        if r.kv is None:
            return False
        ptr = r.kv[0][0].data_ptr()
        if ptr in self._writers:
            return False
        self.cache.drop_beyond(ptr, r.cached)
        return True

    def _scores(self, r: _Request, lg: torch.Tensor) -> Scores:
        # lg holds the rows from the last prefix token on: lg[j] predicts continuation token j
        cont = torch.from_numpy(r.ids[r.n_prefix :]).to(lg.device)
        # one normalising pass over the rows any read needs (the row after the continuation: next, sampling)
        lp = torch.log_softmax(lg[: len(cont) + int(r.full_next or r.sample is not None)], -1)
        rows = lp[: len(cont)]
        out = Scores(
            logprobs=rows.gather(1, cont[:, None])[:, 0].tolist() if len(cont) else [],
            prompt_tokens=r.n_prefix,
            cached_prompt_tokens=r.cached,
        )
        self._stats.scored_tokens += len(cont)
        if r.top_k:
            vals, idx = rows.topk(r.top_k, -1)
            out.top = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
        if r.entropies:
            out.entropies = (-(rows.exp() * rows).sum(-1)).tolist()
        if r.full_dists:
            out.dists = rows.tolist()
        if r.full_next:
            out.next_logprobs = lp[len(cont)].tolist()
        if r.sample is not None:
            fill_sample_reads(out, lp, r.ids[r.n_prefix :], r.sample, r.draws, r.row_candidates, r.fuse)
        out.timing = self._timing(r)
        return out

    def _timing(self, r: _Request) -> CallTiming:
        """``r``'s timing as it is answered, its wait added to the worker's queue time."""
        timing = r.clock.timing()
        self._stats.queue_s += timing.queue_s
        return timing

    # ---------------------------------------------------------------- decode

    def _rng(self, params: GenParams) -> torch.Generator | None:
        if params.greedy or params.seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(params.seed)
        return g

    def _sample(self, r: _Request, logits: torch.Tensor) -> int:
        p = r.params
        if p.greedy:
            return int(logits.argmax())
        probs = sampling_probs(logits, p.temperature, p.top_k, p.top_p)
        tok = int(draw(probs, 1, r.rng))
        if p.sample_logprobs:
            r.sample_logprobs.append(math.log(float(probs[tok])))
        return tok

    def _accept_token(self, r: _Request, logits: torch.Tensor) -> int:
        """Sample the next token of ``r``, append it and decide whether ``r`` is finished."""
        tok = self._sample(r, logits)
        r.generated.append(tok)
        self._stats.generated_tokens += 1
        if r.params.logprobs is not None:
            lp = torch.log_softmax(logits, -1)
            top = {}
            if r.params.logprobs > 0:
                vals, idx = lp.topk(r.params.logprobs)
                top = dict(zip(idx.tolist(), vals.tolist()))
            r.logprobs.append(TokenLogprob(token_id=tok, logprob=float(lp[tok]), top=top))
        if tok in self.eos_ids:
            r.done, r.finish = True, ("eos", None)
        elif r.params.stop and (hit := self._stop_hit(r)) is not None:
            r.done, r.finish = True, ("stop", hit)
        elif len(r.generated) >= r.params.max_tokens:
            r.done, r.finish = True, ("length", None)
        elif r.params.stop_below is not None and doubts(logits, r.params.stop_below):
            r.done, r.finish = True, ("length", None)
            self._stats.confidence_stops += 1
        return tok

    def _piece(self, tok: int) -> str:
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self._pieces[tok] = self.tokenizer.decode([tok], skip_special_tokens=True)
        return piece

    def _stop_hit(self, r: _Request) -> str | None:
        """The stop string the last token completes, if any.

        A stop string not found before this token can only be completed by it, so the tail is decoded only
        when the token's own text holds a stop string's last character (or part of a multi-byte one).
        """
        piece = self._piece(r.generated[-1])
        if "\ufffd" not in piece and not any(s[-1] in piece for s in r.params.stop if s):
            return None
        longest = max(len(s) for s in r.params.stop)
        tail = self.tokenizer.decode(r.generated[-(longest + 2) :], skip_special_tokens=True)
        hits = [s for s in r.params.stop if s in tail]
        return min(hits, key=tail.find) if hits else None

    #: Share of a held batch's cache that may be holes (rejected proposals) or free slots before it is rebuilt.
    MAX_HOLES = 0.25

    def _hold(self, batch: _Batch) -> None:
        """Keep ``batch`` for the next round, unless what it wastes would cost more than rebuilding it.

        Two kinds of waste, each allowed up to ``MAX_HOLES``: holes inside live rows (rejected proposals),
        which only restacking removes (the rows get their own caches back, to be stacked afresh); and free
        slots with the positions no live row attends any more, squeezed out by one copy of the live rows
        (``gather_kv``). A row's left padding is no waste: every layout of rows of different lengths has it.
        """
        live = batch.live()
        mask = batch.mask[live]
        B, W = batch.mask.shape
        first = mask.argmax(1)  # each live row's first position
        span = W - first
        if float((span - mask.sum(1)).sum()) > self.MAX_HOLES * float(span.sum()):
            self._release(batch)
            return
        start = int(first.min())
        if len(live) * (W - start) >= (1 - self.MAX_HOLES) * B * W:
            self._held = batch
            return
        t0 = time.perf_counter()
        self._held = _Batch([batch.rows[i] for i in live], gather_kv(batch.cache, live, start),
                            mask[:, start:].clone(), batch.lengths[live])
        spent = time.perf_counter() - t0
        for r in self._held.rows:
            r.clock.decode_s += spent

    def _release(self, batch: _Batch) -> None:
        """Give ``batch``'s live rows their own caches again (it is about to be rebuilt)."""
        live = batch.live()
        if live:
            for i, kv in zip(live, unstack_kv(batch.cache, batch.mask[live], rows=live)):
                batch.rows[i].kv = kv

    def _joined(self, held: _Batch, active: list[_Request]) -> _Batch | None:
        """``held`` serving exactly ``active``, or None where it cannot.

        Its rows not in ``active`` (cancelled) free their slots; each new row (its own KV, from a prefill)
        is copied into a free slot, or one added after the last, right-aligned with the batch's last
        position: O(new rows), where stacking afresh copies every row. None when a new row is longer
        than the batch or no row of it is left.
        """
        wanted = set(active)
        for i in held.live():
            if held.rows[i] not in wanted:
                held.free(i)
        placed = set(held.rows)
        new = [r for r in active if r not in placed]
        width = held.mask.shape[1]
        if len(new) == len(active) or any(r.kv[0][0].shape[2] > width for r in new):
            return None
        free = [i for i, r in enumerate(held.rows) if r is None]
        extra = len(new) - len(free)
        if extra > 0:  # slots after the last (``GrowingLayer.add_rows``)
            for lay in held.cache.layers:
                lay.add_rows(extra)
            free += range(len(held.rows), len(held.rows) + extra)
            held.rows += [None] * extra
            held.mask = torch.cat([held.mask, held.mask.new_zeros((extra, width))])
            held.lengths = torch.cat([held.lengths, held.lengths.new_zeros(extra)])
        for i, r in zip(free, new):
            for lay, kv in zip(held.cache.layers, r.kv):
                write_row(lay.keys, lay.values, i, kv, width)
            p = r.kv[0][0].shape[2]
            held.mask[i, width - p :] = 1
            held.lengths[i] = p
            held.rows[i], r.kv = r, None
        return held

    def _batch(self, active: list[_Request]) -> _Batch:
        """The round's batch: the held one serving ``active`` (``_joined``), else ``active`` stacked afresh."""
        held, self._held = self._held, None
        if held is not None:
            batch = self._joined(held, active)
            if batch is not None:
                return batch
            self._release(held)
        pasts = [r.kv[0][0].shape[2] for r in active]
        P = max(pasts)
        mask = torch.zeros((len(active), P), dtype=torch.long)
        for i, p in enumerate(pasts):
            mask[i, P - p :] = 1
        return _Batch(list(active), stack_kv([r.kv for r in active], P), mask, torch.tensor(pasts))

    def _decode_round(self, active: list[_Request]) -> list[_Request]:
        """Decode ``active`` together for up to ``round_steps`` steps (more if nobody waits).

        Each step feeds every live row its pending token plus, with token-level
        speculation, the proposed continuation; positions the model rejects are
        masked out of the shared cache rather than cropped, since rows differ.
        """
        t_step = time.perf_counter()
        batch = self._batch(active)
        rows, cache, mask, lengths = batch.rows, batch.cache, batch.mask, batch.lengths
        B = len(rows)
        alive = [r is not None for r in rows]
        steps = 0
        while True:
            rows_prop: list[list[int]] = [[] for _ in rows]
            if self.speculator is not None:
                live = [i for i in range(B) if alive[i]]
                for i, prop in zip(live, self.speculator.propose([rows[i] for i in live])):
                    rows_prop[i] = prop
            K = 1 + max(len(p) for p in rows_prop)
            tokens = torch.full((B, K), self.pad_id, dtype=torch.long)
            new_mask = torch.zeros((B, K), dtype=torch.long)
            for i, (r, prop) in enumerate(zip(rows, rows_prop)):
                if not alive[i]:  # a free slot, or a row done this round: a pad that attends only itself
                    continue
                fed = [r.generated[-1]] + prop
                tokens[i, : len(fed)] = torch.tensor(fed)
                new_mask[i, : len(fed)] = 1
            positions = lengths[:, None] + torch.arange(K)[None, :]
            col0 = mask.shape[1]
            mask = torch.cat([mask, new_mask], 1)
            logits = self._run_model(tokens, mask, positions, cache)
            for i, (r, prop) in enumerate(zip(rows, rows_prop)):
                if not alive[i]:
                    continue
                r.forward_passes += 1
                emitted = matched = 0
                for j in range(len(prop) + 1):  # sample, then compare: lossless for deterministic proposals
                    tok = self._accept_token(r, logits[i, j])
                    emitted += 1
                    hit = j < len(prop) and tok == prop[j]
                    matched += hit
                    if r.done or not hit:
                        break
                self._stats.spec_proposed_tokens += len(prop)
                self._stats.spec_accepted_tokens += matched
                # KV is kept for the pending token fed this step and the accepted proposals before the last emitted one
                mask[i, col0 + emitted :] = 0
                lengths[i] += emitted
            now = time.perf_counter()
            for i, r in enumerate(rows):  # the step (the round's stacking with the first) counts for rows in it
                if not alive[i]:
                    continue
                r.clock.decode_s += now - t_step
                if r.done or r.cancelled:
                    alive[i] = False
                    if r.done and not r.cancelled:  # answered now: its caller need not wait for the round
                        r.kv = unstack_kv(cache, mask[i : i + 1], rows=[i])[0]
                        self._finish(r)
            t_step = now
            steps += 1
            if (not any(alive) or (steps >= self.round_steps and not self._queue.empty())
                    or steps >= 4 * self.round_steps or self._closed):
                break
        batch.mask = mask
        for i in range(B):
            if not alive[i] and rows[i] is not None:  # done or cancelled: its slot is free for a row that joins
                batch.free(i)
        still = [r for r in rows if r is not None]
        if still:  # the batch goes on, however its rows change (``_joined``)
            self._hold(batch)
        return still

    def run_sync(self, reqs: list[_Request]) -> None:
        """Serve ``reqs`` to completion in the calling thread (a draft model inside another worker's engine)."""
        with torch.inference_mode():
            active = self._prefill(reqs)
            while active:
                active = self._decode_round(active)

    def _finish(self, r: _Request) -> None:
        covered = np.concatenate([r.ids, as_ids(r.generated[:-1])])  # the last sampled token has no KV yet
        self.cache.put(covered, r.kv, replaces=r.source, hashes=r.hashes)  # the prompt's, extended if it is kept
        r.kv = None
        reason, stop = r.finish
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        if stop is not None:
            cut = text.find(stop)
            text = text[: cut + (len(stop) if r.params.include_stop_str_in_output else 0)]
        r.resolve(
            Generation(
                token_ids=r.generated,
                text=text,
                finish_reason=reason,
                stop_reason=stop,
                logprobs=r.logprobs if r.params.logprobs is not None else None,
                sample_logprobs=r.sample_logprobs if r.params.sample_logprobs and not r.params.greedy else None,
                prompt_tokens=len(r.ids),
                cached_prompt_tokens=r.cached,
                forward_passes=r.forward_passes,
                timing=self._timing(r),
            )
        )
