"""The public API on real arith models: solve, asolve, stream, solve_batch, results and metrics."""

from __future__ import annotations

import pytest

from orchestrator import Orchestrator
from orchestrator.answer import final_answer, last_boxed

# async tests share the session loop of the session-scoped engines (sync tests take no mark)
session_loop = pytest.mark.asyncio(loop_scope="session")


def test_answer_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "3"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer("<think>\\boxed{1}</think> so \\boxed{2}") == "2"
    assert final_answer("no answer") is None


@session_loop
async def test_asolve_result_and_metrics(arith_small: Orchestrator):
    r = await arith_small.asolve("12 + 7 - 3", id="t1")
    assert r.answer is not None and r.text.endswith("}.")
    assert r.segments and all(s.author == "small" for s in r.segments)
    m = r.metrics
    assert m.tokens["small"] > 5 and m.forward_passes["small"] > 0 and m.wall_s > 0
    assert m.prompt_tokens > 0 and m.finish_reason in ("answer", "eos")


@session_loop
async def test_stream_yields_segments_then_done(arith_small: Orchestrator):
    events = [e async for e in arith_small.stream("40 - 12 + 5")]
    assert events[-1].type == "done" and events[-1].result.answer is not None
    assert [e.segment.text for e in events[:-1]] == [s.text for s in events[-1].result.segments]


@session_loop
async def test_batch_equals_one_by_one(arith_small: Orchestrator):
    problems = ["12 + 7 - 3", "40 - 12 + 5", "33 + 33 - 10", "90 - 45 + 2"]
    batch = await arith_small.asolve_batch(problems, concurrency=4)
    for p, b in zip(problems, batch):
        assert (await arith_small.asolve(p)).text == b.text


def test_sync_api_and_messages_input():
    with Orchestrator.from_config("arith-v1/small-only") as orch:
        r = orch.solve([{"role": "user", "content": "12 + 7 - 3\nPlease reason step by step, and put your final "
                                                     "answer within \\boxed{}."}])
        assert r.answer is not None
        assert [x.answer for x in orch.solve_batch(["1 + 2 + 3"], concurrency=2)] == [orch.solve("1 + 2 + 3").answer]
