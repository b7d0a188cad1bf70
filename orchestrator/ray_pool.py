"""The workers of a run on a Ray cluster: one actor per model replica, placed by its config.

``start_workers`` comes here when ``ray.address`` is set:

- ``local``: start a Ray instance inside this process (a laptop, a test, one GPU box);
- ``auto``: join the running cluster; this is what a job submitted with
  ``ray job submit --working-dir . -- reasonspec eval ... --set ray.address=auto``
  uses. The job's working directory (the repository root) is on every worker's
  path, so ``orchestrator``/``workers``/``policies``/``evals`` import on every node
  and relative model paths such as ``evals/arith/models/small`` resolve there;
- ``ray://host:10001``: a Ray Client driver off the cluster. A source checkout is
  shipped as the job's ``working_dir``, as ``ray job submit --working-dir .`` would;
  an installed package must be installed on the cluster's nodes too;
- any other value is a GCS address (``host:6379``) passed to ``ray.init`` as is.

A Ray that is already initialised (a notebook, the test suite) is used as it is.

How a model's config becomes its actor (``plan_actor``):

- ``placement.num_cpus``/``num_gpus``/``resources`` are the actor's resources.
  ``num_gpus: 1`` gives the model a GPU of its own: Ray sets the actor's
  ``CUDA_VISIBLE_DEVICES`` to it, so the worker's ``cuda`` is that GPU, and a
  configured ``cuda:N`` is read as ``cuda`` because Ray, not the config, picks
  the GPU. Fractional ``num_gpus`` share one GPU between models (with vLLM, also
  split ``engine_args.gpu_memory_utilization`` between them).
- An hf model on an actor without GPUs runs on the CPU: Ray 2.60 no longer hides
  the GPUs from zero-GPU actors, so ``device: auto`` would take one it did not
  reserve. Its ``threads`` default to the actor's ``num_cpus``: left alone, torch
  takes every core of the node and the models of one machine slow each other
  down (a vLLM CPU engine binds its own cores: ``device: cpu:<cores>``).
- ``placement.max_restarts`` restarts a dead actor; with restarts allowed, every
  call is retried once (``max_task_retries=1``) on the restarted actor.
- ``tensor_parallel_size > 1`` (vLLM only): a placement group of that many
  ``{GPU: 1, CPU: 1}`` bundles (``PACK``: one node when it fits) is reserved, the
  engine's actor is scheduled into bundle 0 with ``num_gpus=0`` and
  ``placement_group_capture_child_tasks=True``, and the engine runs with
  ``distributed_executor_backend="ray"``, so vLLM's own Ray workers, one per GPU,
  land in the group's bundles (the pattern of Ray Data's vLLM stage and OpenRLHF).
  ``placement.num_gpus`` is not used then: each rank gets one GPU.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import PACKAGE_ROOT, ConfigError, ModelConfig, RayConfig, RunConfig
from orchestrator.pool import create_local_worker
from workers.protocol import Worker
from workers.ray_worker import DEFAULT_CALL_TIMEOUT_S, RayWorker, ReplicaSet

#: Model loading included: a large checkpoint from a network disk takes minutes.
DEFAULT_READY_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ActorPlan:
    """What one replica of a model asks of Ray."""

    model: ModelConfig  # the config the actor builds its worker from
    options: dict[str, Any]  # ActorClass.options(), less the placement-group strategy
    bundles: list[dict[str, float]] | None  # a placement group to reserve first (tensor parallel)

    @property
    def cpus(self) -> float:
        """CPUs this replica reserves on the cluster."""
        if self.bundles:
            return sum(b.get("CPU", 0.0) for b in self.bundles)
        return self.options["num_cpus"]


def _in_actor(cfg: ModelConfig) -> dict[str, Any]:
    """Changes to a single-actor model's config for life inside its actor (see the module docstring)."""
    p, update = cfg.placement, {}
    if p.num_gpus > 0 and cfg.device.startswith("cuda:"):
        update["device"] = "cuda"
    if cfg.backend == "hf":
        update["threads"] = cfg.threads or max(1, int(p.num_cpus))
        if p.num_gpus == 0 and cfg.device == "auto":
            update["device"] = "cpu"
    return update


def plan_actor(cfg: ModelConfig) -> ActorPlan:
    """The Ray options, placement bundles and in-actor config of one replica of ``cfg``."""
    p = cfg.placement
    common = {
        "num_cpus": p.num_cpus,
        "resources": dict(p.resources),
        "max_restarts": p.max_restarts,
        "max_task_retries": 1 if p.max_restarts != 0 else 0,
        "max_concurrency": p.max_concurrency,
    }
    tp = cfg.tensor_parallel_size
    if tp == 1:
        return ActorPlan(cfg.model_copy(update=_in_actor(cfg)), {**common, "num_gpus": p.num_gpus}, None)
    if cfg.backend != "vllm":
        raise ConfigError(f"model {cfg.path}: tensor_parallel_size={tp} needs backend: vllm (got {cfg.backend})")
    bundles = [{"GPU": 1.0, "CPU": max(1.0, p.num_cpus), **p.resources}] + [{"GPU": 1.0, "CPU": 1.0}] * (tp - 1)
    model = cfg.model_copy(update={"engine_args": {"distributed_executor_backend": "ray", **cfg.engine_args}})
    return ActorPlan(model, {**common, "num_gpus": 0}, bundles)


def connect(ray_cfg: RayConfig, cpus_needed: float = 0.0) -> None:
    """Initialise Ray for ``ray_cfg.address`` unless it already is.

    A ``local`` instance gets at least ``cpus_needed`` logical CPUs: every actor runs
    on this one machine anyway, and a 2-core box must still host small and large
    models with replicas (each actor's torch threads stay capped to its own share).
    """
    if ray.is_initialized():
        return
    address, namespace = ray_cfg.address, ray_cfg.namespace
    if address == "local":
        num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
        ray.init(address="local", namespace=namespace, num_cpus=num_cpus, include_dashboard=False)
    elif address is not None and address.startswith("ray://"):
        checkout = (PACKAGE_ROOT / "pyproject.toml").exists()
        runtime_env = {"working_dir": str(PACKAGE_ROOT)} if checkout else None
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env)
    else:
        ray.init(address=address, namespace=namespace)


def launch(plan: ActorPlan, *, name: str, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> RayWorker:
    """Create one replica's actor (and its placement group); it loads its model in the background."""
    options = dict(plan.options)
    pg = None
    if plan.bundles:
        pg = placement_group(plan.bundles, strategy="PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True,
        )
    return RayWorker.launch(
        partial(create_local_worker, plan.model), name=name, options=options, call_timeout_s=call_timeout_s,
        placement_group=pg,
    )


async def start_ray_workers(
    config: RunConfig,
    roles: tuple[str, ...],
    *,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> dict[str, Worker]:
    """One Worker per role: a ``RayWorker``, or a ``ReplicaSet`` of them when ``replicas > 1``.

    All actors load their models in parallel; this returns once every one answers
    ``info()``. If any fails to start (or start-up is cancelled), every actor and
    placement group created so far is torn down before the error propagates.
    ``close()`` on a returned worker kills its actors.
    """
    plans = {role: plan_actor(config.models[role]) for role in roles}
    connect(config.ray, sum(plans[r].cpus * config.models[r].replicas for r in roles))
    started: list[RayWorker] = []
    workers: dict[str, Worker] = {}
    try:
        for role in roles:
            cfg = config.models[role]
            replicas = []
            for i in range(cfg.replicas):
                name = f"{role} model {cfg.path}" + (f" (replica {i + 1}/{cfg.replicas})" if cfg.replicas > 1 else "")
                started.append(launch(plans[role], name=name, call_timeout_s=call_timeout_s))
                replicas.append(started[-1])
            workers[role] = replicas[0] if len(replicas) == 1 else ReplicaSet(replicas)
        # Wait for all, so that no load is left running unobserved when one fails.
        results = await asyncio.gather(*(w.wait_ready(ready_timeout_s) for w in started), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    except BaseException:
        await asyncio.gather(*(w.close() for w in started), return_exceptions=True)
        raise
    return workers
