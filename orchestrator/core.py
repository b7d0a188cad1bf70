"""The public API: ``Orchestrator``.

    orch = Orchestrator.from_config("arith/specreason")
    result = orch.solve("12 + 7 - 3")                 # sync
    result = await orch.asolve("12 + 7 - 3")          # async
    async for event in orch.stream("12 + 7 - 3"): ... # step events as they happen
    results = orch.solve_batch(problems, concurrency=16)

Workers start on first use and are shared by every request of the orchestrator;
concurrent requests are batched inside the backends. Use either the sync or the
async API on one instance: the sync API runs its own event loop.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.context import ContextFull, fitting_prompt_ids
from orchestrator.pool import start_workers
from orchestrator.prompting import Messages, problem_text, to_messages
from orchestrator.session import Event, ModelHandle, Result, Session
from policies import build_policy
from workers.protocol import GenParams, Worker, WorkerStats


class Orchestrator:
    """Runs one policy over its workers; ``workers`` may be shared (they are then not closed here)."""

    def __init__(self, config: RunConfig, workers: dict[str, Worker] | None = None):
        self.config = config
        self.policy = build_policy(config.policy)
        self.models: dict[str, ModelHandle] = {}
        self._given = workers
        self._start_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adapter: Any = None  # an OnlineAdapter when config.online.enabled (orchestrator.online)

    @classmethod
    def from_config(cls, name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Orchestrator:
        return cls(load_config(name_or_path, overrides))

    @property
    def policy_name(self) -> str:
        return self.policy.name

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.models:
                return
            roles = tuple(r for r in ("small", "mid", "large") if r in self.policy.roles)
            if self._given is not None:
                missing = [r for r in roles if r not in self._given]
                if missing:
                    raise ValueError(f"policy {self.policy.name} needs workers for {missing}")
                workers = {r: self._given[r] for r in roles}
            else:
                for role in roles:  # a model that cannot load says so in one line, before any worker starts
                    try:
                        await asyncio.to_thread(self.config.models[role].check_available)
                    except ConfigError as e:
                        raise ConfigError(f"models.{role}.path: {e}") from None
                workers = await start_workers(self.config, roles)
            models = {}
            for role, worker in workers.items():
                info = await worker.info()
                tok = AutoTokenizer.from_pretrained(self.config.models[role].resolved_path())
                models[role] = ModelHandle(role, worker, tok, info.eos_token_id, info.vocab_fingerprint,
                                           info.context_length, info.process)
            try:
                self.policy.check(models)
                if self.config.online.enabled:  # refuses a policy or a draft worker it cannot adapt
                    from orchestrator.online import OnlineAdapter

                    self.adapter = OnlineAdapter(self.config.online, models, self.policy)
            except BaseException:
                if self._given is None:
                    for h in models.values():
                        await h.worker.close()
                raise
            self.models = models

    async def aclose(self) -> None:
        if self.adapter is not None:
            await self.adapter.aclose()
        models, self.models = self.models, {}
        if self._given is None:  # together: each close is bounded, shutdown waits for the slowest only
            await asyncio.gather(*(h.worker.close() for h in models.values()))

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self.aclose())
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ requests

    def prompt_ids(self, problem: str | Messages) -> dict[str, list[int]]:
        """Each model's prompt for ``problem`` (started models only).

        Raises ``ContextLengthError`` when a prompt leaves its model no room to answer,
        before any model work (a huge prompt is refused without being tokenized).
        """
        msgs = to_messages(problem, self.config.prompt.instruction, self.config.prompt.system)
        return {role: fitting_prompt_ids(h, msgs) for role, h in self.models.items()}

    async def _run_policy(self, session: Session) -> None:
        """The policy over ``session``; a chain that filled a model's context ends with "length"."""
        version = self.adapter.version if self.adapter is not None else 0
        try:
            await self.policy.run(session)
        except ContextFull:
            session.finish("length")
        if self.adapter is not None:  # online adaptation learns from the finished request's draft misses
            self.adapter.observe(session, version)

    def _session(self, problem: str | Messages, id: str | None, seed: int | None,
                 max_tokens: int | None, events: asyncio.Queue | None) -> Session:
        s = self.config.sampling
        base_seed = s.seed if seed is None else seed
        if id is not None:
            base_seed = base_seed * 7919 + zlib.crc32(id.encode())
        return Session(
            problem=problem_text(problem),
            models=self.models,
            prompt_ids=self.prompt_ids(problem),
            params=GenParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens),
            max_tokens=max_tokens or s.max_tokens,
            id=id,
            seed=base_seed,
            events=events,
        )

    async def asolve(self, problem: str | Messages, id: str | None = None, seed: int | None = None,
                     max_tokens: int | None = None) -> Result:
        await self.start()
        session = self._session(problem, id, seed, max_tokens, None)
        await self._run_policy(session)
        return session.result(self.policy.name)

    async def stream(self, problem: str | Messages, id: str | None = None, seed: int | None = None,
                     max_tokens: int | None = None) -> AsyncIterator[Event]:
        """Step events as the policy produces them, then one ``done`` event with the result."""
        await self.start()
        events: asyncio.Queue = asyncio.Queue()
        session = self._session(problem, id, seed, max_tokens, events)
        task = asyncio.create_task(self._run_policy(session))
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                task.result()  # re-raise a policy error
                yield Event(type="done", result=session.result(self.policy.name))
                return
        finally:
            # The consumer went away (or the policy ended): stop the work and leave no task pending,
            # a pending getter would be garbage-collected as "Task was destroyed but it is pending!".
            for pending in (getter, task):
                if pending is not None and not pending.done():
                    pending.cancel()

    async def asolve_batch(self, problems: Iterable[str | Messages], concurrency: int = 8,
                           ids: Iterable[str] | None = None) -> list[Result]:
        await self.start()
        sem = asyncio.Semaphore(concurrency)
        problems = list(problems)
        ids = list(ids) if ids is not None else [None] * len(problems)

        async def one(p: str | Messages, i: str | None) -> Result:
            async with sem:
                return await self.asolve(p, id=i)

        return await asyncio.gather(*(one(p, i) for p, i in zip(problems, ids)))

    async def stats(self) -> dict[str, WorkerStats]:
        return {role: await h.worker.stats() for role, h in self.models.items()}

    # ------------------------------------------------------------ sync API

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("called the sync API inside an event loop; use `await orch.asolve(...)` instead")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def solve(self, problem: str | Messages, id: str | None = None, seed: int | None = None,
              max_tokens: int | None = None) -> Result:
        return self._run(self.asolve(problem, id=id, seed=seed, max_tokens=max_tokens))

    def solve_batch(self, problems: Iterable[str | Messages], concurrency: int = 8,
                    ids: Iterable[str] | None = None) -> list[Result]:
        return self._run(self.asolve_batch(problems, concurrency=concurrency, ids=ids))
