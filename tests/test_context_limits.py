"""Prompts and chains against a model's context length (the arith models attend to 2,048 tokens).

A prompt that cannot fit is refused before any model work (the API, evals, the hf
backend's own guard); a chain that fills the context ends with finish reason "length"
and no model call ever runs past it; closing an hf worker is bounded whatever its
engine is doing. Server cases are in test_server_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from evals.datasets import load_dataset
from evals.runner import ERRORS, RESULTS, run_eval
from orchestrator.config import load_config
from orchestrator.context import MIN_OUTPUT_TOKENS, ContextLengthError
from orchestrator.core import Orchestrator
from workers.hf_backend import CLOSE_TIMEOUT_S, HFWorker
from workers.protocol import GenParams, WorkerError

CONTEXT = 2048
#: About 2,000 prompt tokens: the arith models' context leaves a chain a few dozen tokens.
NEAR_FULL = "1 + " * 1000 + "1"


def _terms(n_tokens: int) -> str:
    """An arith problem of about ``n_tokens`` prompt tokens (each "1 + " is two tokens)."""
    return "1 + " * (n_tokens // 2) + "1"


# ---------------------------------------------------------------- the Python API


@pytest.mark.parametrize("problem", [_terms(3000), _terms(30000), "1" * 10_000_000],
                         ids=["3k-tokens", "30k-tokens", "10MB"])
async def test_a_prompt_over_the_context_is_refused_before_the_policy_runs(
        arith_small: Orchestrator, monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    ran: list[object] = []

    async def policy(session: object) -> None:
        ran.append(session)

    monkeypatch.setattr(arith_small.policy, "run", policy)
    t0 = time.perf_counter()
    with pytest.raises(ContextLengthError, match=f"small model's context is {CONTEXT} tokens") as e:
        await arith_small.asolve(problem)
    with pytest.raises(ContextLengthError):
        async for _ in arith_small.stream(problem):
            pass
    elapsed = time.perf_counter() - t0
    print(f"\n[context] {len(problem)}-character prompt refused twice in {elapsed:.3f}s: {e.value}")
    assert not ran and e.value.role == "small" and e.value.prompt_tokens >= CONTEXT - MIN_OUTPUT_TOKENS
    assert elapsed < 2


async def test_a_huge_prompt_is_refused_without_tokenizing_it(arith_small: Orchestrator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    handle = arith_small.models["small"]
    encoded: list[int] = []
    encode = handle.encode
    monkeypatch.setattr(handle, "encode", lambda text: encoded.append(len(text)) or encode(text))
    with pytest.raises(ContextLengthError, match="characters"):
        arith_small.prompt_ids("7" * 10_000_000)
    assert encoded == []
    assert len(arith_small.prompt_ids(NEAR_FULL)["small"]) <= CONTEXT - MIN_OUTPUT_TOKENS  # a long one that fits


# ---------------------------------------------------------------- chains that fill the context


class Recording:
    """A worker that records how many positions each call needs: prompt + max_tokens, or the scored length."""

    def __init__(self, worker: Any) -> None:
        self.worker, self.positions = worker, []

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Any:
        self.positions.append(len(prompt_ids) + params.max_tokens)
        return await self.worker.generate(prompt_ids, params)

    async def score(self, prefix_ids: list[int], continuation_ids: list[int], **kw: Any) -> Any:
        self.positions.append(len(prefix_ids) + len(continuation_ids))
        return await self.worker.score(prefix_ids, continuation_ids, **kw)

    async def next_token_logprobs(self, prefix_ids: list[int], *args: Any, **kw: Any) -> Any:
        self.positions.append(len(prefix_ids))
        return await self.worker.next_token_logprobs(prefix_ids, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)


@pytest.mark.parametrize("config", ["arith-v1/small-only", "arith-v1/specreason", "arith-v1/specreason-prompt",
                                    "arith-v1/spec-thinking", "arith-v1/consultant", "arith-v1/speculative"])
async def test_a_chain_that_fills_the_context_ends_with_length(engines: Any, config: str) -> None:
    """Step-level and token-level (explicit ids) policies alike: every call fits, the result says "length"."""
    cfg = load_config(config)
    workers = {role: Recording(engines("hf", role)) for role in cfg.models}
    orch = Orchestrator(cfg, workers=workers)
    result = await orch.asolve(NEAR_FULL, max_tokens=4 * CONTEXT)  # the budget alone would never stop it
    positions = [p for w in workers.values() for p in w.positions]
    print(f"\n[context] {config}: {result.metrics.finish_reason}, {result.metrics.tokens} written, "
          f"largest call {max(positions)} positions")
    assert result.metrics.finish_reason == "length"
    assert max(positions) <= CONTEXT
    assert sum(result.metrics.tokens.values()) > 0  # a step the prompt judge has no room to read is dropped


# ---------------------------------------------------------------- the hf backend's own guard


async def test_hf_worker_never_runs_past_its_context(engines: Any) -> None:
    worker = engines("hf", "small")
    assert (await worker.info()).context_length == CONTEXT
    with pytest.raises(WorkerError, match=f"2048 tokens leaves no room .* context of {CONTEXT}"):
        await worker.generate([5] * CONTEXT, GenParams(max_tokens=4))
    with pytest.raises(WorkerError, match=f"2049 tokens exceeds the model's context of {CONTEXT}"):
        await worker.score([5] * 2000, [5] * 49)
    with pytest.raises(WorkerError, match=f"3000 tokens exceeds the model's context of {CONTEXT}"):
        await worker.next_token_logprobs([5] * 3000, [1])
    g = await worker.generate([5] * (CONTEXT - 3), GenParams(max_tokens=100, temperature=1.0, seed=0))
    assert len(g.token_ids) <= 3 and (g.finish_reason == "length" or len(g.token_ids) < 3)


async def test_hf_close_is_bounded_while_a_forward_pass_runs() -> None:
    """Shutdown must not wait for a long pass (a 30k-token prefill took minutes): close returns, callers fail."""
    worker = HFWorker(load_config("arith-v1/small-only").models["small"].resolved_path())
    entered, release = threading.Event(), threading.Event()
    forward = worker._run_model  # the engine's one forward pass (the lean runner or transformers')

    def stuck_forward(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)  # bounded: the test releases it at the end
        return forward(*args, **kwargs)

    worker._run_model = stuck_forward
    try:
        call = asyncio.ensure_future(worker.generate([5, 6, 7], GenParams(max_tokens=4)))
        assert await asyncio.to_thread(entered.wait, 30)
        t0 = time.perf_counter()
        await asyncio.wait_for(worker.close(), CLOSE_TIMEOUT_S + 5)
        with pytest.raises(WorkerError, match="closed"):
            await asyncio.wait_for(call, 5)
        elapsed = time.perf_counter() - t0
        print(f"\n[context] close with a pass in progress: {elapsed:.2f}s")
        assert elapsed < CLOSE_TIMEOUT_S + 1
        with pytest.raises(WorkerError, match="closed"):
            await worker.generate([5], GenParams(max_tokens=1))
    finally:
        release.set()


# ---------------------------------------------------------------- evals


async def test_eval_records_a_problem_too_long_for_the_context_as_an_error(arith_small: Orchestrator,
                                                                           tmp_path: Path) -> None:
    """A 10 MB dataset line is one per-problem error, found at once; the run goes on with the others."""
    data = tmp_path / "data.jsonl"
    rows = [{"id": "huge", "problem": "1 + " * 2_500_000 + "1", "answer": "2500001"},
            {"id": "small", "problem": "2 + 3", "answer": "5"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.perf_counter()
    problems = load_dataset("custom", path=data)
    summary = await run_eval(arith_small, problems, tmp_path / "out", concurrency=2, progress=False)
    elapsed = time.perf_counter() - t0
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS).read_text().splitlines()]
    results = [json.loads(line) for line in (tmp_path / "out" / RESULTS).read_text().splitlines()]
    print(f"\n[context] eval with a {data.stat().st_size // 1_000_000} MB line: {elapsed:.2f}s")
    assert [(e["id"], e["error"].split(":")[0]) for e in errors] == [("huge", "ContextLengthError")]
    assert [r["id"] for r in results] == ["small"] and summary["errors"] == 1
    assert elapsed < 20
