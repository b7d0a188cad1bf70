"""Drafts made from the target's own weights inside the hf worker: quantized (ML-SpecQD) and Kangaroo.

Real arith models throughout: every variant must keep the large model's greedy output token for
token, since the large model verifies every draft (and every level of a multi-level draft).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.protocol import GenParams

PROBLEMS = ["53 + 51 - 6 + 20", "12 + 7 - 3", "40 - 12 + 5 + 9"]


async def same_greedy_output(plain: Any, fast: Any, max_tokens: int = 80) -> None:
    from orchestrator.prompting import prompt_ids, to_messages

    prompts = [prompt_ids(plain.tokenizer, to_messages(p)) for p in PROBLEMS]
    params = GenParams(max_tokens=max_tokens)
    want = await asyncio.gather(*(plain.generate(p, params) for p in prompts))
    got = await asyncio.gather(*(fast.generate(p, params) for p in prompts))  # batched together
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def spec(**kw: Any) -> Any:
    from orchestrator.config import SpeculativeConfig

    return SpeculativeConfig(**kw)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kangaroo adapter for the arith large model, trained here in a few seconds."""
    from evals.kangaroo_adapter import train_adapter
    from tests.conftest import arith_model

    out = tmp_path_factory.mktemp("kangaroo")
    train_adapter(arith_model("large"), out, steps=12, batch_size=8, lr=2e-3, eval_every=6, ckpt_every=6, quiet=True, world="arith")
    return out


async def test_quantized_draft_keeps_greedy_output(engines: Any) -> None:
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker
    from workers.hf_drafts import draft_levels

    fast = HFWorker(arith_model("large"), speculative=spec(method="quantized"), threads=1)
    try:
        draft = fast.speculator.draft
        qlinear = draft.model.model.layers[0].mlp.down_proj
        assert isinstance(qlinear, torch.ao.nn.quantized.dynamic.Linear) and qlinear.weight().dtype == torch.qint8
        assert isinstance(fast.model.model.layers[0].mlp.down_proj, torch.nn.Linear)  # the target keeps its weights
        await same_greedy_output(engines("hf", "large"), fast)
        (level,) = draft_levels(fast)
        assert level["drafts"] > 0 and level["proposed"] > 0
        assert level["acceptance"] > 0.8  # the target's own weights, in int8: it nearly always agrees
        assert level["accepted_per_draft"] == level["accepted"] / level["drafts"]
    finally:
        await fast.close()


async def test_multi_level_quantized_draft_keeps_greedy_output(engines: Any) -> None:
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker
    from workers.hf_drafts import draft_levels

    inner = spec(method="draft", model=arith_model("small"), num_speculative_tokens=3)
    fast = HFWorker(arith_model("large"), speculative=spec(method="quantized", draft=inner), threads=1)
    try:
        await same_greedy_output(engines("hf", "large"), fast)
        upper, lower = draft_levels(fast)
        assert upper["draft"].startswith("int8 copy of") and lower["draft"] == arith_model("small")
        assert upper["proposed"] > 0 and lower["proposed"] > 0 and lower["drafts"] > 0
    finally:
        await fast.close()


async def test_kangaroo_self_draft_is_verified_losslessly(engines: Any, adapter_dir: Path) -> None:
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker
    from workers.hf_drafts import draft_levels

    fast = HFWorker(arith_model("large"), speculative=spec(method="kangaroo", model=str(adapter_dir)), threads=1)
    try:
        assert fast.speculator.stop_below == 0.6  # the reference's default threshold
        draft = fast.speculator.draft
        layers = draft.model.model.layers
        assert len(layers) == 3 and layers[0] is fast.model.model.layers[0]  # the target's own first layers
        assert not hasattr(layers[2], "mlp")  # the adapter: attention and norms only
        await same_greedy_output(engines("hf", "large"), fast)
        (level,) = draft_levels(fast)
        assert level["drafts"] > 0 and 0 < level["accepted"] <= level["proposed"]
        assert level["proposed"] < 4 * level["drafts"]  # some drafts ended early at the threshold
        assert level["early_stops"] > 0
    finally:
        await fast.close()


def test_early_exit_rule() -> None:
    from workers.sampling import doubts

    sure = torch.tensor([4.0, 0.0, 0.0])  # top-1 probability 0.96
    unsure = torch.tensor([0.5, 0.0, 0.0])  # 0.45
    assert not doubts(sure, 0.6) and doubts(unsure, 0.6)
    assert not doubts(unsure, 0.4)


async def test_wrong_setups_fail_at_start(adapter_dir: Path) -> None:
    from tests.conftest import arith_model
    from workers.hf_backend import HFWorker

    with pytest.raises(ValueError, match="takes no model"):
        HFWorker(arith_model("large"), speculative=spec(method="quantized", model=arith_model("small")))
    with pytest.raises(ValueError, match="needs speculative.model"):
        HFWorker(arith_model("large"), speculative=spec(method="kangaroo"))
    with pytest.raises(ValueError, match="does not fit"):  # trained for the large model, not the small one
        HFWorker(arith_model("small"), speculative=spec(method="kangaroo", model=str(adapter_dir)))
    with pytest.raises(ValueError, match="not a Kangaroo adapter"):
        HFWorker(arith_model("large"), speculative=spec(method="kangaroo", model=arith_model("small")))


def test_adapter_training_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded and resumable: a run that crashes after its step-2 checkpoint, run again, ends with the same
    adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    import evals.kangaroo_adapter as ka
    from tests.conftest import arith_model

    kw = dict(steps=4, batch_size=4, eval_every=2, ckpt_every=2, quiet=True, world="arith")
    real, calls = ka.arith_rows, []

    def crashing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:  # the batch of step 4: steps 1-3 are done, the last checkpoint is step 2's
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ka, "arith_rows", crashing)
    with pytest.raises(KeyboardInterrupt):
        ka.train_adapter(arith_model("large"), tmp_path / "a", **kw)
    monkeypatch.setattr(ka, "arith_rows", real)
    info = ka.train_adapter(arith_model("large"), tmp_path / "a", **kw)
    ka.train_adapter(arith_model("large"), tmp_path / "b", **kw)
    assert info["steps"] == 4
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "README.md").read_text().startswith("# Kangaroo adapter")


def test_config_keeps_the_hf_only_drafts_off_vllm() -> None:
    from pydantic import ValidationError

    from orchestrator.config import ModelConfig

    ok = ModelConfig(path="m", speculative={"method": "quantized", "draft": {"method": "draft", "model": "s"}})
    assert ok.speculative.draft.model == "s"
    with pytest.raises(ValidationError, match="method=kangaroo: hf backend only"):
        ModelConfig(path="m", backend="vllm", speculative={"method": "kangaroo", "model": "a"})
    with pytest.raises(ValidationError, match="draft: hf backend only"):
        ModelConfig(path="m", backend="vllm", speculative={"method": "draft", "model": "s", "draft": {"method": "ngram"}})
    with pytest.raises(ValidationError, match="extra"):  # strict down the levels
        ModelConfig(path="m", speculative={"method": "quantized", "draft": {"methd": "draft"}})
