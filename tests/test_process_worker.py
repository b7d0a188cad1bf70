"""A worker in a child process (``workers.process_worker``): the protocol as in-process, and failures that say so.

The conformance suite (``test_worker_conformance.py``) runs every protocol check on
it too (``hf-process``); these tests cover what only a second process adds.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial

import pytest

from orchestrator.core import Orchestrator
from orchestrator.prompting import prompt_ids, to_messages
from tests.conftest import arith_model
from workers.hf_backend import HFWorker
from workers.process_worker import ProcessWorker
from workers.protocol import GenParams, WorkerError

pytestmark = pytest.mark.asyncio(loop_scope="session")


MODEL = "arith2/small"  # writes a few hundred tokens a solution: calls long enough to cancel or kill


def small_process() -> ProcessWorker:
    return ProcessWorker(partial(HFWorker, arith_model(MODEL)), name="small model")


async def prompt(problem: str = "53 + 51 - 6 + 20 - 7 + 88 - 19") -> list[int]:
    from transformers import AutoTokenizer

    return prompt_ids(AutoTokenizer.from_pretrained(arith_model(MODEL)), to_messages(problem))


async def test_the_engine_runs_in_its_own_process_and_serves_calls_cancelled_or_not(engines):
    w = engines("hf-process", MODEL)
    info = await w.info()
    assert info.process == w.pid != os.getpid()
    ids = await prompt()
    whole = await w.generate(ids, GenParams(max_tokens=400))
    cancelled = asyncio.ensure_future(w.generate(ids + whole.token_ids[:3], GenParams(max_tokens=400)))
    await asyncio.sleep(0.02)
    assert not cancelled.done()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    again = await w.generate(ids, GenParams(max_tokens=400))  # the worker goes on, and agrees with itself
    assert again.token_ids == whole.token_ids
    before = (await w.stats()).generated_tokens
    await asyncio.sleep(0.3)  # the cancelled request was dropped in the child: it writes no more tokens
    assert (await w.stats()).generated_tokens == before


async def test_a_dead_child_fails_calls_in_flight_and_later_with_the_models_name():
    w = small_process()
    ids = await prompt()
    await w.generate(ids, GenParams(max_tokens=2))  # built and serving
    call = asyncio.ensure_future(w.generate(ids, GenParams(max_tokens=400)))
    await asyncio.sleep(0.02)
    assert not call.done()
    w._proc.kill()  # noqa: SLF001 -- the process dies as if killed by the OS
    with pytest.raises(WorkerError, match="small model: its worker process exited"):
        await call
    with pytest.raises(WorkerError, match="small model"):
        await w.generate(ids, GenParams(max_tokens=2))
    await w.close()
    await w.close()  # idempotent


async def test_a_worker_that_cannot_be_built_says_why_on_first_use(tmp_path):
    w = ProcessWorker(partial(HFWorker, str(tmp_path / "no-model")), name="large model")
    with pytest.raises(Exception, match="no-model") as first:
        await w.info()
    assert not isinstance(first.value, asyncio.CancelledError)
    with pytest.raises(WorkerError, match="large model: could not build its worker"):
        await w.info()
    await w.close()


async def test_models_in_processes_of_their_own_write_what_they_write_in_process():
    """Consultant Decoding, pipelined across the two processes, writes the in-process (serial) text."""
    problems = ["53 + 51 - 6 + 20", "88 - 23 + 41 - 7"]
    texts = {}
    for hosted in ("false", "true"):
        sets = [f"models.small.process={hosted}", f"models.large.process={hosted}"]
        async with Orchestrator.from_config("arith/consultant", overrides=sets) as orch:
            pids = {(await h.worker.info()).process for h in orch.models.values()}
            assert (len(pids) == 2 and os.getpid() not in pids) if hosted == "true" else pids == {os.getpid()}
            assert orch.policy.pipelined(orch._session(problems[0], None, None, None, None)) == (hosted == "true")
            texts[hosted] = [r.text for r in await orch.asolve_batch(problems, concurrency=2)]
    assert texts["true"] == texts["false"] and all("\\boxed{" in t for t in texts["true"])
