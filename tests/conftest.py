"""Shared fixtures. Sections are owned by different suites: append a new section, keep the others."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from orchestrator.core import Orchestrator

# ---------------------------------------------------------------- evals: a real arith small-only Orchestrator


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def arith_small() -> AsyncIterator[Orchestrator]:
    """The arith small model under the small-only policy, started once for the whole test session."""
    orch = Orchestrator.from_config("arith-v1/small-only")
    await orch.start()
    yield orch
    await orch.aclose()


# ---------------------------------------------------------------- workers: one engine per backend for the session

import pytest  # noqa: E402

from orchestrator.config import PACKAGE_ROOT, load_config  # noqa: E402


async def solve_all(workers: dict, config: str, problems: list[str], overrides: list[str] | None = None) -> list:
    """``problems`` solved at once under ``config`` on already-started ``workers`` (shared engines, not closed)."""
    orch = Orchestrator(load_config(config, overrides), workers=workers)
    try:
        return await orch.asolve_batch(problems, concurrency=len(problems))
    finally:
        await orch.aclose()


def arith_model(name: str) -> str:
    """A committed arith model: ``small`` / ``large`` of the first generation, ``arith2/small`` (mid, large) of the second."""
    world, _, size = name.rpartition("/")
    path = PACKAGE_ROOT / "evals" / (world or "arith") / "models" / size
    if not (path / "config.json").exists():
        pytest.fail(f"the committed arith model {path} is missing: train it with `python -m evals.{world or 'arith'}.train`")
    return str(path)


def start_worker(backend: str, name: str):
    """``backend``: hf, vllm, or hf-process (an hf engine in a child process, ``workers.process_worker``)."""
    if backend == "hf":
        from workers.hf_backend import HFWorker

        return HFWorker(arith_model(name))
    if backend == "hf-process":
        from functools import partial

        from workers.hf_backend import HFWorker
        from workers.process_worker import ProcessWorker

        return ProcessWorker(partial(HFWorker, arith_model(name)), name=f"{name} model")
    from workers.vllm_backend import VLLMWorker

    return VLLMWorker.create(arith_model(name), engine_args={"enforce_eager": True})


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engines():
    """Workers by (backend, model), started on first use and shared by the whole session."""
    started: dict[tuple[str, str], object] = {}

    def get(backend: str, name: str):
        if (backend, name) not in started:
            started[(backend, name)] = start_worker(backend, name)
        return started[(backend, name)]

    yield get
    for w in started.values():
        await w.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session", params=["hf", "vllm", "hf-process"])
async def small_worker(request, engines):
    """The arith small model behind each backend (and the hf one in a process of its own)."""
    return engines(request.param, "small")
