"""Configs: packaged ones load by name; mistakes name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in
                                        (CONFIG_DIR / "arith").glob("*.yaml")))
def test_packaged_arith_configs_load(name):
    cfg = load_config(name)
    assert cfg.policy.type and cfg.models


def test_unknown_key_names_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  large: {path: evals/arith/models/large, backnd: hf}\npolicy: {type: large-only}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml(.|\n)*models\.large\.backnd: unknown key"):
        load_config(bad)


def test_wrong_type_and_policy_param(tmp_path: Path):
    bad = tmp_path / "t.yaml"
    bad.write_text("models:\n  small: {path: evals/arith/models/small}\n  large: {path: evals/arith/models/large}\n"
                   "policy: {type: specreason, threshold: high}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml(.|\n)*policy\.specreason\.threshold"):
        load_config(bad)


def test_missing_model_path_says_so(tmp_path: Path):
    bad = tmp_path / "m.yaml"
    bad.write_text("models:\n  large: {path: ./no/such/model}\npolicy: {type: large-only}\n")
    with pytest.raises(ConfigError, match=r"models\.large\.path.*not found"):
        load_config(bad)


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config("arith-v1/specreason", ["policy.threshold=5", "models.large.backend=vllm",
                                           "models.large.speculative.method=ngram", "ray.address=auto"])
    assert cfg.policy.threshold == 5.0 and cfg.models["large"].backend == "vllm"
    assert cfg.models["large"].speculative.method == "ngram" and cfg.ray.address == "auto"
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("arith-v1/specreason", ["policy.threshold"])


def test_unknown_config_name_lists_packaged_ones():
    with pytest.raises(ConfigError, match="arith-v1/specreason"):
        load_config("arith-v1/nope")
