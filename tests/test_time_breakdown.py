"""The time breakdown (issue 19): critical-path arithmetic on scripted calls, invariants on real runs.

Scripted records and a sleeping worker test the arithmetic exactly; the real runs (hf
backend, the arith models, two problems) test that what the engines report adds up.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from evals.datasets import load_dataset
from evals.runner import SUMMARY_JSON, load_records, run_eval
from orchestrator.core import Orchestrator
from orchestrator.session import ModelHandle, Session
from orchestrator.timing import CallRecord, LoopMeter, critical_chain, problem_time
from tests.scripted import CharTokenizer
from workers.protocol import CallTiming, Generation, GenParams, WorkerInfo, WorkerStats



def rec(role: str, start: float, end: float, prefill: float = 0.0, decode: float = 0.0, queue: float = 0.0,
        timed: bool = True) -> CallRecord:
    timing = CallTiming(queue_s=queue, prefill_s=prefill, decode_s=decode)
    return CallRecord(role, start, end, timing if timed else None)


# ---------------------------------------------------------------- the arithmetic


def test_sequential_calls_make_the_whole_critical_path():
    calls = [rec("small", 0.0, 1.0, decode=0.8, queue=0.1), rec("large", 1.2, 1.5, prefill=0.25),
             rec("small", 1.5, 2.0, decode=0.4)]
    t = problem_time(calls, wall_s=2.5)
    assert t.critical_calls == 3
    assert t.critical_path_s == pytest.approx(0.8 + 0.25 + 0.4)
    assert t.queue_s == pytest.approx(0.1)
    assert t.overhead_s == pytest.approx(1.8 - 1.45 - 0.1)  # the calls' wall beyond model and queue
    assert t.gap_s == pytest.approx(2.5 - 1.8)
    assert t.critical_path_s + t.queue_s + t.overhead_s + t.off_path_s + t.gap_s == pytest.approx(t.wall_s)
    assert t.efficiency == pytest.approx(1.45 / 2.5)
    assert t.roles["small"].calls == 2 and t.roles["small"].decode_s == pytest.approx(1.2)
    assert t.roles["large"].prefill_s == pytest.approx(0.25)


def test_calls_in_flight_together_are_alternatives_on_the_path():
    # a judge (large) and a look-ahead draft (small) overlap; the heavier one is on the path
    step, judge = rec("small", 0, 1, decode=0.9), rec("large", 1, 1.3, prefill=0.3)
    draft = rec("small", 1, 2, decode=0.9)
    chain = critical_chain([step, judge, draft])
    assert chain == [step, draft]
    assert problem_time([step, judge, draft], 2.0).critical_path_s == pytest.approx(1.8)
    # a chain of short calls can outweigh one long call that overlaps them all
    long = rec("large", 0, 3, prefill=1.0)
    shorts = [rec("small", i, i + 0.9, decode=0.8) for i in range(3)]
    assert critical_chain([long, *shorts]) == shorts


def test_waits_on_calls_off_the_path_are_not_counted_as_time_between_calls():
    """A step drafted beside the large model's rewrite of it (``rewrite_ahead``): the rewrite is the heavier path,
    the judge waits in the large engine behind it and ends 10 s after it. Those 10 s are the problem waiting on a
    call off the path, not orchestrator time: only the 0.5 s with no call in flight is gap."""
    draft, rewrite = rec("small", 0, 10, decode=10), rec("large", 0, 30, decode=30)
    judge = rec("large", 10, 40, prefill=5, queue=25)
    nxt = rec("small", 40.5, 50, decode=9.5)
    t = problem_time([draft, rewrite, judge, nxt], wall_s=50.5)
    assert critical_chain([draft, rewrite, judge, nxt]) == [rewrite, nxt]
    assert t.critical_path_s == pytest.approx(39.5) and t.overhead_s == pytest.approx(0)
    assert t.off_path_s == pytest.approx(10) and t.gap_s == pytest.approx(1.0)  # 40 -> 40.5, and 50 -> 50.5
    assert t.critical_path_s + t.queue_s + t.overhead_s + t.off_path_s + t.gap_s == pytest.approx(t.wall_s)


def test_a_call_starting_as_another_ends_follows_it():
    a, b = rec("small", 0, 1, decode=1), rec("large", 1, 2, prefill=1)
    assert critical_chain([b, a]) == [a, b]


def test_untimed_calls_count_their_wall_as_model_time():
    t = problem_time([rec("x", 0, 0.5, timed=False)], 1.0)
    assert t.critical_path_s == pytest.approx(0.5) and t.roles["x"].untimed == 1
    empty = problem_time([], 0.3)
    assert empty.critical_path_s == 0 and empty.gap_s == pytest.approx(0.3) and empty.efficiency == 0


class SleepingWorker:
    """Answers each generate after ``wait`` (queue) + ``work`` (decode) seconds, timing itself as a backend does."""

    def __init__(self, wait: float, work: float) -> None:
        self.wait, self.work = wait, work

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        await asyncio.sleep(self.wait + self.work)
        return Generation(token_ids=[ord("a")], text="a", finish_reason="length",
                          timing=CallTiming(queue_s=self.wait, decode_s=self.work))

    async def info(self) -> WorkerInfo:
        return WorkerInfo(model_id="sleep", backend="scripted", device="cpu", vocab_size=256,
                          vocab_fingerprint="chars", context_length=4096)

    async def stats(self) -> WorkerStats:
        return WorkerStats()

    async def close(self) -> None:
        pass


async def test_session_puts_every_call_on_the_timeline():
    """Two sequential calls, then two at once: the path takes the sequential ones and the longer of the pair."""
    tok = CharTokenizer()
    models = {r: ModelHandle(r, SleepingWorker(0.01, w), tok, vocab_fingerprint="chars")
              for r, w in (("small", 0.05), ("large", 0.02))}
    session = Session(problem="p", models=models, prompt_ids={"small": [1], "large": [1]}, params=GenParams(),
                      max_tokens=100)
    await session.generate("small")
    await session.generate("large")
    await asyncio.gather(session.generate("small"), session.generate("large"))
    t = session.result("test").metrics.time
    assert t.roles["small"].calls == 2 and t.roles["large"].calls == 2
    assert t.critical_calls == 3
    assert t.critical_path_s == pytest.approx(0.05 + 0.02 + 0.05)
    assert t.queue_s == pytest.approx(0.03)
    assert 0 <= t.overhead_s and 0 <= t.gap_s
    assert t.critical_path_s + t.queue_s + t.overhead_s + t.off_path_s + t.gap_s == pytest.approx(t.wall_s)
    assert 0 < t.efficiency <= 1


async def test_loop_meter_sees_busy_code_and_waits():
    meter = LoopMeter().start()
    await asyncio.sleep(0.05)  # waiting: the loop sits in its selector
    sum(i * i for i in range(200_000))  # running: the loop is busy
    t = meter.stop()
    assert t["busy_s"] is not None and 0 < t["busy_s"] < t["wall_s"]
    assert t["wall_s"] - t["busy_s"] >= 0.04
    assert 0 < t["cpu_s"] <= t["wall_s"] + 0.01
    assert "select" not in vars(asyncio.get_running_loop()._selector)  # restored


# ---------------------------------------------------------------- real runs (hf, arith models)


def check_run(summary: dict, records: list[dict], roles: tuple[str, ...]) -> None:
    time = summary["time"]
    assert summary["efficiency"] == time["problems"]["efficiency"]
    assert 0 < summary["efficiency"] <= 1
    for r in records:
        t = r["time"]
        assert 0 < t["critical_path_s"] <= t["wall_s"], r["id"]
        assert 0 < r["efficiency"] <= 1
        for term in ("queue_s", "overhead_s", "off_path_s", "gap_s"):
            assert t[term] >= -1e-6, (term, t)
        assert t["critical_path_s"] + t["queue_s"] + t["overhead_s"] + t["off_path_s"] + t["gap_s"] == \
            pytest.approx(t["wall_s"])
    assert set(time["calls"]) == set(roles) == set(time["workers"])
    for role in roles:
        c, w = time["calls"][role], time["workers"][role]
        assert c["untimed"] == 0 and c["calls"] > 0
        assert c["model_s"] == pytest.approx(c["prefill_s"] + c["decode_s"])
        assert c["prefill_s"] > 0
        assert c["model_s"] + c["queue_s"] <= c["call_s"] + 1e-6
        # the engine's books: busy + idle is its clock; phases inside busy, forward passes inside phases
        assert w["busy_s"] + w["idle_s"] == pytest.approx(w["clock_s"], abs=1e-3)
        assert 0 < w["forward_s"] <= w["prefill_s"] + w["decode_s"] <= w["busy_s"] + 1e-3
        assert 0 < w["cpu_s"] <= w["busy_s"] + 0.01  # waiting for a core or the GIL costs no CPU
        assert w["queue_s"] >= c["queue_s"] - 1e-3  # the engine also counts calls answered as they were cancelled
        # one problem at a time and one call per worker at a time: the calls' model time is the engine's work
        assert c["model_s"] <= w["busy_s"] + 1e-3
    assert time["loop"]["busy_s"] is not None and 0 < time["loop"]["busy_s"] < time["loop"]["wall_s"]


@pytest.mark.parametrize("config, roles", [("arith-v1/specreason", ("small", "large")), ("arith-v1/large-only", ("large",))])
async def test_breakdown_of_a_real_run(tmp_path, config, roles):
    orch = Orchestrator.from_config(config, ["sampling.max_tokens=120"])
    try:
        summary = await run_eval(orch, load_dataset("arith", limit=2), tmp_path, concurrency=1, progress=False)
    finally:
        await orch.aclose()
    on_disk = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert on_disk["time"] == json.loads(json.dumps(summary["time"]))
    check_run(on_disk, load_records(tmp_path / "results.jsonl"), roles)
    decode = on_disk["time"]["calls"]["small" if "small" in roles else "large"]["decode_s"]
    assert decode > 0  # generations decode; judges and scores only prefill
    if "small" in roles:
        assert on_disk["time"]["calls"]["large"]["prefill_s"] > 0


async def test_hf_calls_carry_their_timing(engines):
    worker = engines("hf", "small")
    before = await worker.stats()
    g = await worker.generate([1, 2, 3], GenParams(max_tokens=5))
    s = await worker.score([1, 2, 3], [4, 5])
    n = await worker.next_token_logprobs([1, 2, 3, 4], [5])
    after = await worker.stats()
    assert g.timing.decode_s > 0 and g.timing.prefill_s > 0
    for t in (s.timing, n.timing):
        assert t.prefill_s > 0 and t.decode_s == 0 and t.queue_s >= 0
    assert after.queue_s - before.queue_s == pytest.approx(sum(x.timing.queue_s for x in (g, s, n)))
    assert after.busy_s + after.idle_s == pytest.approx(after.clock_s, abs=1e-3)
    assert after.cpu_s > before.cpu_s


@pytest.mark.vllm
async def test_vllm_calls_carry_their_timing(engines):
    pytest.importorskip("vllm")
    worker = engines("vllm", "small")
    g = await worker.generate([1, 2, 3], GenParams(max_tokens=5))
    s = await worker.score([1, 2, 3], [4, 5])
    n = await worker.next_token_logprobs([1, 2, 3, 4], [5])
    assert g.timing is not None and g.timing.prefill_s > 0 and g.timing.decode_s > 0
    for t in (s.timing, n.timing):
        assert t is not None and t.prefill_s > 0 and t.decode_s == 0 and t.queue_s >= 0
    stats = await worker.stats()
    assert stats.busy_s + stats.idle_s == pytest.approx(stats.clock_s, abs=1e-3)
    assert stats.prefill_s >= g.timing.prefill_s + s.timing.prefill_s + n.timing.prefill_s - 1e-9
    assert not math.isnan(stats.queue_s)
