"""Scale benchmark: what one reasoning step costs the orchestrator on a 32k-token chain.

    python -m evals.bench_scale [--steps 200] [--step-tokens 160] [--concurrency 1 16] [--policies ...]

Real reasoning chains run to 8k-32k tokens in hundreds of steps. This benchmark
drives each policy through such a chain with Mistral's 131k-vocabulary BPE
tokenizer (tekken, shipped offline inside ``mistral_common``, loaded as a Hugging
Face fast tokenizer) and **replay workers**: they write a fixed synthetic chain
(steps of about ``--step-tokens`` tokens, reflection and verification cues at
their start now and then, so Speculative Thinking hands over) and answer every
call after a fixed latency (``asyncio.sleep``: model time that costs no CPU), so
what is measured is the orchestrator itself: its CPU time per step on the event
loop's thread, at the start and at the end of the chain, and the bytes a call
would carry across a process boundary (pickled arguments and results, as Ray
sends them).

With ``--backend hf`` or ``--backend vllm`` the same policies run on the real
backends instead, over a randomly initialised 2-layer Llama with that vocabulary
(written once to a temporary folder), sampled at temperature 1 so it writes
steps of ``--step-tokens`` tokens (its stop strings never fire on random text):
model time is small, so the per-step costs of orchestrator and backends show.

Reported per policy and concurrency: steps (accepted segments: a reasoning step
for step-level policies, a draft round for token-level ones), tokens, the event
loop's CPU ms per step over the run, and at concurrency 1 per step at the start
(median over steps 2-21, or 5% of the steps when there are more than 400) and at the
end (the last 20, or 5%) of the chain; the overhead, the time a
chain waited with no model call in flight over the time it had one (what the
orchestrator adds to the workers' time; the loop's time on the replay workers' own
work and on the byte counting is not charged); and KiB per step crossing the worker
boundary. Timings are ratios within one run; repeat before concluding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import pickle
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from orchestrator.config import RunConfig
from orchestrator.core import Orchestrator
from orchestrator.prompting import prompt_ids, to_messages
from workers.protocol import Fusion, Generation, GenParams, NextToken, Scores, WorkerInfo, WorkerStats

POLICIES = {
    "specreason": {"type": "specreason", "judge": "prompt", "threshold": 7, "max_step_tokens": 512},
    "spec-thinking": {"type": "spec-thinking"},
    "consultant": {"type": "consultant", "draft_tokens": 8},
    "speculative": {"type": "speculative", "draft_tokens": 8},
    "reflective": {"type": "reflective", "draft_tokens": 8},
}
CUES = ["Wait, let me double-check this.", "Let me verify: the sum above.", "Alternatively, think of it as"]


CHAT_TEMPLATE = (
    "{%- for m in messages -%}[{{ m['role'] | upper }}]{{ m['content'] }}[/{{ m['role'] | upper }}]{%- endfor -%}"
    "{%- if add_generation_prompt -%}[ASSISTANT]<think>\n{%- endif -%}"
)


def tekken_folder() -> Path:
    """Mistral's tekken vocabulary (inside ``mistral_common``, offline) as a standard fast-tokenizer folder.

    Transformers converts ``tekken.json``; a chat template with a think tag and
    ``</s>`` as EOS make it usable as a reasoning model's tokenizer.
    """
    import mistral_common

    folder = Path(tempfile.gettempdir()) / "reasonspec-tekken"
    if (folder / "tokenizer.json").exists():
        return folder
    src = sorted((Path(mistral_common.__file__).parent / "data").glob("tekken_*.json"))[-1]
    raw = Path(tempfile.mkdtemp())
    shutil.copy(src, raw / "tekken.json")
    tok = AutoTokenizer.from_pretrained(raw)
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token, tok.pad_token = "</s>", "<pad>"
    tok.save_pretrained(folder)
    return folder


def random_model_folder(tokenizer: Any) -> Path:
    """A randomly initialised small Llama over ``tokenizer``'s vocabulary, saved with it (for the real backends)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / "reasonspec-scale-model"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=65536,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_chain(steps: int, step_tokens: int, tokenizer: Any) -> str:
    """``steps`` reasoning steps of about ``step_tokens`` tokens, separated by blank lines."""
    out = []
    for i in range(steps):
        words = [CUES[(i // 7) % len(CUES)]] if i % 7 == 3 else []
        k = 0
        while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < step_tokens:
            a, b = (i * 37 + k * 11) % 997, (i * 13 + k * 29) % 991
            words.append(f"We know {a} + {b} = {a + b}, so the running total moves on.")
            k += 1
        out.append(" ".join(words))
    return "\n\n".join(out) + "\n\nSo the answer is \\boxed{42}."


CHAIN: contextvars.ContextVar[int] = contextvars.ContextVar("chain", default=0)  # which chain a call serves


@dataclass
class Meter:
    """Bytes that would cross a process boundary, and when each chain had a model call in flight.

    What the replay workers compute and the pickling are the benchmark's own work
    (a real model runs elsewhere): it is kept apart (``own``) so it is not charged
    to the orchestrator, neither its CPU time nor, in the overhead, the wall time
    the event loop spent on it (``waiting_s``).
    """

    sent: int = 0
    received: int = 0
    cpu_s: float = 0.0
    busy: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    spans: list[tuple[float, float]] = field(default_factory=list)  # wall intervals of the benchmark's own work

    @contextlib.contextmanager
    def own(self) -> Iterator[None]:
        t, w = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu_s += time.thread_time() - t
            self.spans.append((w, time.perf_counter()))

    def count(self, args: Any, result: Any) -> None:
        self.sent += len(pickle.dumps(args))
        self.received += len(pickle.dumps(result))

    def in_flight_s(self, chain: int) -> float:
        """Time during which at least one of ``chain``'s calls was being served (a union of intervals)."""
        return union_s(self.busy.get(chain, []))

    def waiting_s(self, chain: int, start: float, end: float) -> float:
        """Time in [start, end] when ``chain`` had no call in flight and the loop was not on the benchmark's work."""
        spans = [(max(a, start), min(b, end)) for a, b in self.spans if b > start and a < end]
        return (end - start) - union_s(self.busy.get(chain, []) + spans)


def union_s(intervals: list[tuple[float, float]]) -> float:
    """The length of a union of intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class ReplayWorker:
    """Writes a fixed chain (by position after the prompt) after a fixed latency.

    ``deviate_every``: the small replica writes a wrong token every that many
    positions, so token-level policies see rejections; ``reject_every``: every that
    many judge reads scores 0 (SpecReason's rewrites).
    """

    def __init__(self, chain_ids: list[int], tokenizer: Any, prompt_len: int, *, per_token_s: float,
                 per_call_s: float, meter: Meter, deviate_every: int = 0, reject_every: int = 0):
        self.chain, self.tok, self.prompt_len = chain_ids, tokenizer, prompt_len
        self.per_token_s, self.per_call_s, self.meter = per_token_s, per_call_s, meter
        self.deviate_every, self.reject_every = deviate_every, reject_every
        self.eos = tokenizer.eos_token_id
        self.vocab = len(tokenizer)
        self.digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
        delim = [i for i, t in enumerate(chain_ids) if "\n\n" in tokenizer.decode([t])]
        self._next_delim = [0] * (len(chain_ids) + 1)
        j = len(delim) - 1
        nxt = len(chain_ids)
        for pos in range(len(chain_ids), -1, -1):  # next delimiter token at or after pos
            while j >= 0 and delim[j] >= pos:
                nxt = delim[j]
                j -= 1
            self._next_delim[pos] = nxt
        self.busy_s = 0.0
        self.judges = 0

    def _token(self, pos: int) -> int:
        if pos >= len(self.chain):
            return self.eos
        if self.deviate_every and pos % self.deviate_every == self.deviate_every - 1:
            return self.chain[(pos + 1) % len(self.chain)]
        return self.chain[pos]

    async def _sleep(self, tokens: int) -> None:
        t = self.per_call_s + self.per_token_s * tokens
        self.busy_s += t
        start = time.perf_counter()
        await asyncio.sleep(t)
        self.meter.busy.setdefault(CHAIN.get(), []).append((start, time.perf_counter()))

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        with self.meter.own():
            g = self._generate(prompt_ids, params)
            self.meter.count((prompt_ids, params), g)
        await self._sleep(len(g.token_ids))
        return g

    def _generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        pos = max(0, len(prompt_ids) - self.prompt_len)
        end = pos + params.max_tokens
        reason = "length"
        if params.stop:
            d = self._next_delim[min(pos, len(self.chain))] + 1
            if d <= end:
                end, reason = d, "stop"
        ids = [self._token(p) for p in range(pos, end)]
        if self.eos in ids:
            ids, reason = ids[: ids.index(self.eos) + 1], "eos"
        text = self.tok.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            text = text[: text.find("\n\n")]
        return Generation(token_ids=ids, text=text, finish_reason=reason, forward_passes=len(ids),
                          prompt_tokens=len(prompt_ids), cached_prompt_tokens=len(prompt_ids) - 1)

    async def score(self, prefix_ids: list[int], continuation_ids: list[int], **options: Any) -> Scores:
        with self.meter.own():
            s = self._score(prefix_ids, continuation_ids, **options)
            self.meter.count((prefix_ids, continuation_ids), s)
        await self._sleep(0)
        return s

    def _score(self, prefix_ids: list[int], continuation_ids: list[int], top_k: int = 0, entropies: bool = False,
               full_dists: bool = False, full_next: bool = False, sample: GenParams | None = None,
               fuse: Fusion | None = None) -> Scores:
        pos = len(prefix_ids) - self.prompt_len
        mine = [self._token(pos + i) for i in range(len(continuation_ids) + 1)]
        lps = [-0.05 if t == m else -6.0 for t, m in zip(continuation_ids, mine)]
        vocab = self.vocab
        row = lambda t: [-30.0] * t + [-0.05] + [-30.0] * (vocab - t - 1)  # noqa: E731
        return Scores(
            logprobs=lps,
            top=[{m: -0.05} for m in mine[:-1]] if top_k else None,
            dists=[row(m) for m in mine[:-1]] if full_dists else None,
            next_logprobs=row(mine[-1]) if full_next else None,
            # a fused read (Reflective Verification) is over the continuation's first n - offset tokens
            sampled=None if sample is None else mine[: len(mine) - (fuse.offset if fuse else 0)],
            prompt_tokens=len(prefix_ids), cached_prompt_tokens=len(prefix_ids) - 1,
        )

    async def next_token_logprobs(self, prefix_ids: list[int], candidates: list[int], top_k: int = 0) -> NextToken:
        with self.meter.own():
            self.judges += 1
            bad = self.reject_every and self.judges % self.reject_every == 0
            top = {self.digits[0 if bad else 9]: -0.1}
            out = NextToken(candidates={c: top.get(c, -5.0) for c in candidates}, top=top)
            self.meter.count((prefix_ids, candidates), out)
        await self._sleep(0)
        return out

    async def info(self) -> WorkerInfo:
        return WorkerInfo(model_id="replay", backend="replay", device="cpu", vocab_size=len(self.tok),
                          vocab_fingerprint="tekken", context_length=1 << 20, eos_token_id=self.eos)

    async def stats(self) -> WorkerStats:
        return WorkerStats(busy_s=self.busy_s)

    async def close(self) -> None:
        pass


@dataclass
class Run:
    policy: str
    concurrency: int
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    step_cpu_ms: list[list[float]] = field(default_factory=list)  # per chain, per accepted segment
    cpu_s: float = 0.0  # the event loop thread's CPU over the run, the benchmark's own pickling excluded
    wall_s: float = 0.0
    waiting_s: float = 0.0  # mean over chains: time a chain had no model call in flight (``Meter.waiting_s``)
    worker_s: float = 0.0  # mean over chains: time a chain had a model call in flight
    bytes_per_step: float = 0.0

    def row(self) -> dict[str, Any]:
        steps = sum(self.steps)
        row = {
            "policy": self.policy, "concurrency": self.concurrency, "steps": statistics.mean(self.steps),
            "tokens": statistics.mean(self.tokens), "cpu_ms_per_step": round(1e3 * self.cpu_s / steps, 3),
            "cpu_ms_first20": None, "cpu_ms_last20": None, "last_over_first": None,
            "wall_s": round(self.wall_s, 3), "worker_s": round(self.worker_s, 3),
            "overhead": round(self.waiting_s / self.worker_s, 4) if self.worker_s else None,
            "kib_per_step": round(self.bytes_per_step / 1024, 2),
        }
        if self.concurrency == 1:  # per-step CPU is only one chain's own at concurrency 1
            f, l_ = start_end_ms(self.step_cpu_ms[0])
            row.update(cpu_ms_first20=round(f, 3), cpu_ms_last20=round(l_, 3), last_over_first=round(l_ / f, 3))
        return row


def start_end_ms(marks: list[float]) -> tuple[float, float]:
    """The median CPU per segment at the start of a chain and at its end.

    Over the first and last 20 segments (the first skipped: it also pays the request's set-up),
    or 5% of them when there are more than 400: a token-level round costs ~0.2 ms here, so a
    mean over 20 of them moved 0.7-1.6x between repeated runs on the same code (a collection
    of the garbage collector or a timer landing in one window); medians over longer windows
    see the growth and not those.
    """
    w = max(20, len(marks) // 20)
    return statistics.median(marks[1 : 1 + w]), statistics.median(marks[-w:])


class Metered:
    """A real worker whose calls are metered like the replay workers' (bytes; in-flight time per chain)."""

    def __init__(self, worker: Any, meter: Meter):
        self.worker, self.meter = worker, meter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.worker, name)
        if name not in ("generate", "score", "next_token_logprobs"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = await attr(*args, **kwargs)
            self.meter.busy.setdefault(CHAIN.get(), []).append((start, time.perf_counter()))
            with self.meter.own():
                self.meter.count(args, out)
            return out

        return call


async def run_policy(name: str, chain: str, tok: Any, folder: Path, concurrency: int, args: argparse.Namespace) -> Run:
    real = args.backend != "replay"
    policy = dict(POLICIES[name])
    if real:  # random weights never write a stop string: steps end at their length limit
        policy.update({"specreason": {"max_step_tokens": args.step_tokens, "judge": "likelihood", "threshold": 5},
                       "spec-thinking": {"max_segment_tokens": args.step_tokens}}.get(name, {}))
    model = {"path": str(folder), "backend": args.backend if real else "hf", "threads": 1}
    config = RunConfig.model_validate({
        "name": f"scale-{name}",
        "models": {"small": model, "large": model},
        "policy": policy,
        "sampling": {"temperature": 1.0 if real else 0.0, "max_tokens": args.max_tokens},
        "prompt": {"instruction": "Solve it step by step."},
    })
    meter = Meter()
    if real:
        orch = Orchestrator(config)
        await orch.start()
        for h in orch.models.values():
            h.worker = Metered(h.worker, meter)
        small = large = None
    else:
        prompt_len = len(prompt_ids(tok, to_messages("problem", config.prompt.instruction)))
        chain_ids = tok.encode(chain, add_special_tokens=False)
        common = dict(meter=meter, per_call_s=args.per_call_ms / 1e3)
        small = ReplayWorker(chain_ids, tok, prompt_len, per_token_s=args.small_ms / 1e3, deviate_every=50, **common)
        large = ReplayWorker(chain_ids, tok, prompt_len, per_token_s=args.large_ms / 1e3, reject_every=10, **common)
        orch = Orchestrator(config, workers={"small": small, "large": large})
        await orch.start()
    run = Run(name, concurrency)

    spans: list[tuple[int, float, float]] = []  # each chain's start and end

    async def one(i: int) -> None:
        CHAIN.set(i)  # the tasks the policy starts inherit it
        t0 = time.perf_counter()
        cpu, own, marks = time.thread_time(), meter.cpu_s, []
        steps = 0
        async for ev in orch.stream("problem", id=f"p{i}"):
            now = time.thread_time()
            if ev.type == "segment" and ev.segment.accepted:
                marks.append((now - cpu - (meter.cpu_s - own)) * 1e3)
                cpu, own = now, meter.cpu_s
                steps += 1
            elif ev.type == "done":
                run.tokens.append(sum(ev.result.metrics.accepted_tokens.values()))
        spans.append((i, t0, time.perf_counter()))
        run.steps.append(steps)
        run.step_cpu_ms.append(marks)

    t0, cpu0, own0 = time.perf_counter(), time.thread_time(), meter.cpu_s
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    run.wall_s = time.perf_counter() - t0
    run.cpu_s = time.thread_time() - cpu0 - (meter.cpu_s - own0)
    busy = [meter.in_flight_s(i) for i in range(concurrency)]
    run.worker_s = statistics.mean(busy)
    run.waiting_s = statistics.mean(meter.waiting_s(i, a, b) for i, a, b in spans)
    run.bytes_per_step = (meter.sent + meter.received) / max(1, sum(run.steps))
    await orch.aclose()
    return run


def print_table(rows: list[dict[str, Any]], console: Console, backend: str = "replay") -> None:
    workers = "replay workers" if backend == "replay" else f"{backend} backend, random-weight model"
    t = Table(title=f"orchestrator CPU per step, long chain ({workers}, tekken 131k vocab)")
    for h in ("policy", "c", "steps", "tokens", "ms/step", "@start", "@end", "end/st", "overhead", "KiB/step"):
        t.add_column(h, justify="right" if h != "policy" else "left")
    num = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        t.add_row(r["policy"], str(r["concurrency"]), f"{r['steps']:.0f}", f"{r['tokens']:.0f}",
                  num(r["cpu_ms_per_step"]), num(r["cpu_ms_first20"]), num(r["cpu_ms_last20"]),
                  num(r["last_over_first"]), num(100 * r["overhead"], "{:.1f}%"), num(r["kib_per_step"], "{:.0f}"))
    console.print(t)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = tekken_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    chain = synthetic_chain(args.steps, args.step_tokens, tok)
    if args.backend != "replay":
        folder = random_model_folder(tok)
    rows = []
    for c in args.concurrency:
        for name in args.policies:
            rows.append((await run_policy(name, chain, tok, folder, c, args)).row())
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-tokens", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--small-ms", type=float, default=0.2, help="replay small model: ms per written token")
    ap.add_argument("--large-ms", type=float, default=1.0, help="replay large model: ms per written token")
    ap.add_argument("--per-call-ms", type=float, default=2.0, help="replay models: ms per call")
    ap.add_argument("--backend", choices=["replay", "hf", "vllm"], default="replay",
                    help="replay workers (the orchestrator alone) or a real backend on a random-weight model")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.backend != "replay":
        args.max_tokens = min(args.max_tokens, args.steps * args.step_tokens)
    rows = asyncio.run(main_async(args))
    print_table(rows, Console(width=max(100, Console().width)), args.backend)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
