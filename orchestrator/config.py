"""Run configuration: pydantic models loaded from YAML, strict.

An unknown key or a wrong type is an error naming the key and the file. Configs
are found by path or by name (``arith/specreason`` -> the packaged
``configs/arith/specreason.yaml``) and accept dotted overrides
(``models.large.backend=vllm``) whose values are parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies import PolicyConfig

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_ROOT / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpeculativeConfig(Strict):
    """Token-level speculation inside one worker (issue: vLLM backend + SD)."""

    method: Literal["ngram", "draft", "eagle"] | None = None
    num_speculative_tokens: int = Field(4, ge=1, le=32)
    model: str | None = Field(None, description="draft / EAGLE head path for method=draft|eagle")
    prompt_lookup_min: int = Field(2, ge=1)
    prompt_lookup_max: int = Field(4, ge=1)


class PlacementConfig(Strict):
    """Resources of a model's Ray actor (ignored in-process)."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    max_restarts: int = Field(1, ge=-1)
    max_concurrency: int = Field(1000, ge=1)


class ModelConfig(Strict):
    path: str = Field(description="local model folder (absolute, or relative to the package root) or hub id")
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; vllm also cpu:<cores> (its OpenMP binding) "
                                            "and cuda:<ids> (CUDA_VISIBLE_DEVICES of its engine)")
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    max_batch_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1, description="hf on CPU: intra-op threads of this model's engine "
                                                        "(e.g. 1 each so two models use one core each); None: torch's default")
    kv_cache_tokens: int = Field(200_000, ge=1024, description="hf: tokens of KV kept for prefix reuse (LRU)")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    replicas: int = Field(1, ge=1)
    engine_args: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")

    def resolved_path(self) -> str:
        return resolve_model_path(self.path)


class SamplingConfig(Strict):
    """Decoding settings shared by every model of a run."""

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(1024, ge=1, description="budget of reasoning + answer tokens per problem")
    seed: int = 0


class PromptConfig(Strict):
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    system: str | None = None


class EvalConfig(Strict):
    dataset: str = "arith"
    dataset_path: str | None = None
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    concurrency: int = Field(1, ge=1)
    samples: int = Field(1, ge=1)
    out: str | None = None
    fields: dict[str, str] = Field(default_factory=dict, description="problem/answer/id field names in a JSONL file")


class RayConfig(Strict):
    address: str | None = Field(None, description="None: workers in-process; local | auto | ray://host:port")
    namespace: str = "reasonspec"


class RunConfig(Strict):
    name: str = "run"
    models: dict[str, ModelConfig]
    policy: PolicyConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("models")
    @classmethod
    def _roles(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        unknown = set(v) - {"small", "large", "mid"}
        if unknown:
            raise ValueError(f"unknown model role(s) {sorted(unknown)}; use small, large (and mid)")
        return v


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


def resolve_model_path(path: str) -> str:
    """Local folder (absolute or relative to CWD, then to the package root) or hub id."""
    p = Path(path).expanduser()
    if p.is_absolute():
        if not p.exists():
            raise ConfigError(f"model path {path} does not exist")
        return str(p)
    for base in (Path.cwd(), PACKAGE_ROOT):
        if (base / p).exists():
            return str((base / p).resolve())
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith("."):
        return path  # a hub id such as Qwen/QwQ-32B
    raise ConfigError(f"model path {path!r} not found (looked in {Path.cwd()} and {PACKAGE_ROOT}) and is not a hub id")


def find_config(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", CONFIG_DIR / f"{p}.yml"):
        if cand.exists():
            return cand
    known = sorted(str(c.relative_to(CONFIG_DIR).with_suffix("")) for c in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found; packaged configs: {', '.join(known)}")


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(overrides).items():
        _set_dotted(data, key, value)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(lines)) from None
    for role, m in cfg.models.items():
        try:
            m.resolved_path()
        except ConfigError as e:
            raise ConfigError(f"{path}: models.{role}.path: {e}") from None
    return cfg
