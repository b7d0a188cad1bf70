"""Starting the workers a run needs: in-process (default) or on Ray."""

from __future__ import annotations

from functools import partial
from typing import Any

from orchestrator.config import ModelConfig, RunConfig, resolve_model_path
from workers.protocol import Worker


def create_local_worker(cfg: ModelConfig) -> Worker:
    """A worker in this process, for the configured backend."""
    path = cfg.resolved_path()
    spec = cfg.speculative if cfg.speculative.method else None
    if spec is not None and spec.model:
        spec = spec.model_copy(update={"model": resolve_model_path(spec.model)})
    if cfg.backend == "hf":
        from workers.hf_backend import HFWorker

        return HFWorker(
            path, device=cfg.device, dtype=cfg.dtype, kv_cache_tokens=cfg.kv_cache_tokens,
            max_batch_size=cfg.max_batch_size, speculative=spec, threads=cfg.threads, fast_forward=cfg.fast_forward,
        )
    from workers.vllm_backend import VLLMWorker

    return VLLMWorker.create(
        path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, max_batch_size=cfg.max_batch_size,
        speculative=spec.model_dump() if spec else None, tensor_parallel_size=cfg.tensor_parallel_size,
        engine_args=cfg.engine_args, device=cfg.device,
    )


async def start_workers(config: RunConfig, roles: tuple[str, ...]) -> dict[str, Worker]:
    """One worker per role (replicas and Ray placement when ``ray.address`` is set)."""
    if config.ray.address:
        from orchestrator.ray_pool import start_ray_workers

        return await start_ray_workers(config, roles)
    workers: dict[str, Any] = {}
    try:
        for role in roles:
            cfg = config.models[role]
            if cfg.process:
                from workers.process_worker import ProcessWorker

                workers[role] = ProcessWorker(partial(create_local_worker, cfg), name=f"{role} model {cfg.path}")
            else:
                workers[role] = create_local_worker(cfg)
    except BaseException:
        for w in workers.values():
            await w.close()
        raise
    return workers
