"""The configs for real hub model pairs on GPUs: they validate, follow the papers' settings, and put each model
on its own GPU through Ray. They cannot run here (no GPU, no hub); this checks what would be asked of a cluster."""

from __future__ import annotations

import pytest

from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.ray_pool import plan_actor

GPU_CONFIGS = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for d in ("math500", "aime")
                     for p in (CONFIG_DIR / d).glob("*.yaml"))


def test_every_paper_policy_has_a_config():
    for d in ("math500", "aime"):
        assert {f"{d}/{p}" for p in ("large-only", "specreason", "spec-thinking", "consultant")} <= set(GPU_CONFIGS)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_places_each_model_on_its_own_gpu(name):
    cfg = load_config(name)
    assert cfg.sampling.temperature == 0.6 and cfg.sampling.top_p == 0.95 and cfg.sampling.max_tokens >= 8192
    assert cfg.ray.address is not None
    plans = {role: plan_actor(m) for role, m in cfg.models.items()}
    for role, plan in plans.items():
        m = cfg.models[role]
        assert m.backend == "vllm" and "/" in m.path  # hub ids
        assert plan.options["num_gpus"] == 1 and plan.bundles is None  # a whole GPU each: never shared
    # Ray hands each actor a distinct GPU, so a two-model config needs (and gets) two GPUs
    assert sum(p.options["num_gpus"] for p in plans.values()) == len(cfg.models)
