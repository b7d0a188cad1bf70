"""Any worker inside a Ray actor, and a set of replicas behind one Worker.

- ``WorkerActor`` is the actor body: it builds one local worker (hf or vLLM) in
  its own process, on the resources Ray gave it, and forwards the protocol's
  calls to it. It is asynchronous, so every concurrent request of the driver is
  in flight inside the actor at once and the backend batches them.
- ``RayWorker`` is the driver-side client: the Worker protocol on an actor
  handle. Each call awaits the actor method's object ref under a per-call
  timeout and turns every Ray failure into a ``WorkerError`` that names the model,
  so a policy never sees a Ray exception and a call never hangs.
- ``ReplicaSet`` spreads requests over N workers (Ray actors or not) with prefix
  affinity, so a session keeps hitting the replica that holds its KV cache.

Fault tolerance is Ray's: the actor is created with ``max_restarts`` and
``max_task_retries``, so when its process dies Ray starts a new one (which loads
the model again) and re-sends the calls that were in flight; a call whose retries
are spent, or an actor whose restarts are spent, fails with a ``WorkerError``.
A restarted actor starts with empty caches and zeroed ``stats()``.

The factory that builds the worker inside the actor is passed in by the caller
(``orchestrator.ray_pool`` passes ``create_local_worker`` bound to the model's
config), so this module knows nothing of configuration and the package
dependencies keep pointing one way (orchestrator -> workers).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from workers.protocol import ROUTED_CALLS, Worker, WorkerError, WorkerInfo, WorkerStats, forwarding

#: Upper bound on one call, restarts and retries included: far above any sane step
#: or judge call, low enough that a stuck engine fails its requests within the hour.
DEFAULT_CALL_TIMEOUT_S = 1800.0
#: How long ``close`` lets the actor shut its engine down before killing it.
CLOSE_GRACE_S = 30.0


class WorkerTimeoutError(WorkerError):
    """A call got no answer within its timeout (a stuck engine, or an actor Ray cannot place)."""


@forwarding("_serve")
class WorkerActor:
    """Actor body: one local worker in this process (wrapped with ``ray.remote`` below).

    ``factory`` builds the worker; Ray calls the constructor again, with the same
    factory, when it restarts the actor.
    """

    def __init__(self, factory: Callable[[], Worker]):
        self._worker = factory()

    async def _serve(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._worker, name)(*args, **kwargs)

    async def close(self) -> None:
        await self._worker.close()

    async def pid(self) -> int:
        return os.getpid()


RemoteWorkerActor = ray.remote(WorkerActor)


def _death_reason(e: RayActorError) -> str:
    """The line of Ray's multi-line actor error that says why the actor is gone (or the constructor's exception)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@forwarding("_call")
class RayWorker:
    """The Worker protocol on a ``WorkerActor``: each call awaits the actor method's ref.

    ``name`` appears in every error (e.g. ``"large model /models/qwq (replica 2/4)"``).
    ``placement_group``, when the actor was scheduled into one (tensor parallel), is
    removed on ``close`` together with the actor.
    """

    def __init__(
        self,
        actor: ActorHandle,
        *,
        name: str,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        placement_group: PlacementGroup | None = None,
        demand: str = "",
    ):
        self.actor = actor
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.placement_group = placement_group
        self.demand = demand  # what the actor asked Ray for, for the error when it cannot be placed
        self._closed = False
        self._ready = False  # the actor has answered once: its worker exists and can be shut down gracefully

    @classmethod
    def launch(
        cls,
        factory: Callable[[], Worker],
        *,
        name: str,
        options: dict[str, Any],
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        placement_group: PlacementGroup | None = None,
    ) -> RayWorker:
        """Create the actor (non-blocking: the model loads in the background; see ``wait_ready``).

        ``options`` go to ``ActorClass.options`` (num_cpus, num_gpus, resources,
        max_restarts, max_task_retries, max_concurrency, scheduling_strategy).
        """
        actor = RemoteWorkerActor.options(**options).remote(factory)
        if placement_group is not None:
            demand = f"placement group {placement_group.bundle_specs}"
        else:
            wanted = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
            demand = str({k: v for k, v in {**wanted, **options.get("resources", {})}.items() if v})
        return cls(actor, name=name, call_timeout_s=call_timeout_s, placement_group=placement_group, demand=demand)

    async def _call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        if self._closed:
            raise WorkerError(f"{self.name}: worker is closed")
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        ref = getattr(self.actor, method).remote(*args, **kwargs)
        try:
            result = await asyncio.wait_for(ref, timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            ray.cancel(ref)  # stop the work in the actor too (an async actor cancels the coroutine)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise WorkerTimeoutError(f"{self.name}: no answer to {method} within {timeout_s:.0f}s") from None
        except RayTaskError as e:  # the worker inside the actor raised
            cause = e.cause
            detail = str(cause) if isinstance(cause, WorkerError) else repr(cause)
            raise WorkerError(f"{self.name}: {method} failed: {detail}") from e
        except RayActorError as e:
            if self._closed:
                raise WorkerError(f"{self.name}: worker closed during {method}") from e
            if e.actor_init_failed:
                raise WorkerError(f"{self.name}: its Ray actor failed to start: {_death_reason(e)}") from e
            raise WorkerError(
                f"{self.name}: its Ray actor died during {method} ({_death_reason(e)}); no restarted actor completed "
                "the call (placement.max_restarts spent, or its one retry failed too)"
            ) from e
        self._ready = True
        return result

    # ---------------------------------------------------------------- protocol

    async def close(self) -> None:
        """Let the engine shut down cleanly (vLLM frees its GPU memory), then kill the actor.

        Idempotent. Calls still in flight fail with ``WorkerError("... closed")``. An
        actor that never answered (still loading, or never placed) is killed at once.
        """
        if self._closed:
            return
        self._closed = True
        if self._ready:
            try:
                await asyncio.wait_for(self.actor.close.remote(), CLOSE_GRACE_S)
            except (asyncio.TimeoutError, RayError):
                pass  # already dead or stuck: the kill below is what frees the resources
        ray.kill(self.actor, no_restart=True)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)

    # ---------------------------------------------------------------- Ray side

    async def wait_ready(self, timeout_s: float) -> WorkerInfo:
        """Wait until the actor is placed and its model loaded; fail clearly if it cannot be placed in time."""
        try:
            return await self._call("info", timeout_s=timeout_s)
        except WorkerTimeoutError:
            raise WorkerTimeoutError(
                f"{self.name}: not ready within {timeout_s:.0f}s; the cluster may lack the resources it asks for "
                f"({self.demand or 'see its Ray options'}; free now: {ray.available_resources()})"
            ) from None

    async def pid(self) -> int:
        """The actor's process id (to watch it, or to kill it when testing fault tolerance)."""
        return await self._call("pid")


def _sum_stats(stats: Sequence[WorkerStats]) -> WorkerStats:
    fields = WorkerStats.model_fields
    return WorkerStats(**{f: sum(getattr(s, f) for s in stats) for f in fields})


@forwarding("_on", ROUTED_CALLS)
class ReplicaSet:
    """One Worker over N replicas of a model, routing each request by prefix affinity.

    Why this rule: a backend answers a session's next call cheaply only if that call
    lands on the replica that holds the session's KV cache (hf prefix cache, vLLM
    APC). Calls of one session share their first tokens, so a request is keyed by a
    hash of its first ``affinity_tokens`` tokens and goes where the longest earlier
    key that is a prefix of it went. Prompts shorter than ``affinity_tokens`` are
    keyed by all their tokens, and the lookup tries every prefix length, so a
    session whose prompt is still short (it grows by a step per call) keeps its
    replica too.

    A request that matches nothing (a new session) goes to the replica with the
    fewest outstanding calls, which spreads sessions evenly. A match is overridden
    when its replica has more than ``max_imbalance`` calls in flight beyond the
    least loaded one: re-prefilling a context elsewhere costs one prefill, while
    piling onto one replica (e.g. every prompt opening with the same long system
    prompt) would serialise the whole run. Counting calls, not tokens, keeps the
    rule simple; every replica batches what it is given.

    Errors pass through unchanged: a replica whose actor died for good keeps failing
    its calls with ``WorkerError`` rather than having them silently re-run elsewhere.
    """

    def __init__(
        self,
        replicas: Sequence[Worker],
        *,
        affinity_tokens: int = 64,
        max_imbalance: int = 4,
        max_keys: int = 100_000,
    ):
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one replica")
        self.replicas = list(replicas)
        self.affinity_tokens = affinity_tokens
        self.max_imbalance = max_imbalance
        self.max_keys = max_keys
        self.outstanding = [0] * len(self.replicas)
        self._keys: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica index, LRU
        self._next = 0  # rotates ties between equally loaded replicas

    def route(self, ids: list[int]) -> int:
        """The replica index for a request whose token ids start with ``ids``."""
        hashes = list(itertools.accumulate(ids[: self.affinity_tokens], lambda h, t: hash((h, t)), initial=0))[1:]
        least = self._least_loaded()
        chosen = least
        for h in reversed(hashes):
            if h in self._keys:
                preferred = self._keys[h]
                if self.outstanding[preferred] - self.outstanding[least] <= self.max_imbalance:
                    chosen = preferred
                break
        if hashes:
            self._keys[hashes[-1]] = chosen
            self._keys.move_to_end(hashes[-1])
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        return chosen

    def _least_loaded(self) -> int:
        n = len(self.replicas)
        order = [(self._next + i) % n for i in range(n)]
        best = min(order, key=lambda i: self.outstanding[i])
        self._next = (best + 1) % n
        return best

    async def _on(self, name: str, ids: list[int], *args: Any, **kwargs: Any) -> Any:
        """Call ``name`` on the replica that ``ids`` (the call's token sequence) routes to."""
        i = self.route(ids)
        self.outstanding[i] += 1
        try:
            return await getattr(self.replicas[i], name)(ids, *args, **kwargs)
        finally:
            self.outstanding[i] -= 1

    # ---------------------------------------------------------------- protocol

    async def info(self) -> WorkerInfo:
        return await self.replicas[0].info()  # replicas run the same model

    async def stats(self) -> WorkerStats:
        """The replicas' counters summed (``busy_s`` is summed too: replica-seconds)."""
        return _sum_stats(await asyncio.gather(*(r.stats() for r in self.replicas)))

    async def close(self) -> None:
        results = await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
