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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies import PolicyConfig

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_ROOT / "configs"


class Strict(BaseModel):
    """Base of every config section: no unknown keys, no coercion, finite numbers.

    Strict types because YAML and ``--set`` values arrive typed: ``max_tokens: true`` or
    ``limit: "5"`` is a mistake to report, not a value to convert (lax pydantic turns
    ``true`` into 1); ``.inf`` and ``.nan`` parse as floats and are never a sane setting.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class SpeculativeConfig(Strict):
    """Token-level speculation inside one worker (issue: vLLM backend + SD)."""

    method: Literal["ngram", "draft", "eagle", "quantized", "kangaroo"] | None = Field(
        None, description="quantized (ML-SpecQD: the target's own weights, quantized, draft for it) and kangaroo "
                          "(the target's first layers plus a trained adapter) run on the hf backend")
    num_speculative_tokens: int = Field(4, ge=1, le=32)
    model: str | None = Field(None, description="draft / EAGLE head path for method=draft|eagle; "
                                                "the adapter folder for method=kangaroo")
    prompt_lookup_min: int = Field(2, ge=1)
    prompt_lookup_max: int = Field(4, ge=1)
    # hf-only knobs; None by default so that they never reach vLLM's speculative_config
    quantize: Literal["int8"] | None = Field(None, description="method=quantized: the weight format (None: int8)")
    draft_confidence: float | None = Field(
        None, gt=0, lt=1, description="end a draft after a token whose top-1 probability is under this "
                                      "(Kangaroo's second early exit; None: 0.6 for kangaroo, never for the others)")
    draft: SpeculativeConfig | None = Field(
        None, description="speculation inside the draft itself (multi-level ML-SpecQD: a smaller draft model "
                          "drafting for the quantized one); every level verifies exactly, so the output is unchanged")


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
    process: bool = Field(False, description="in-process runs: this model's worker in a child process of its own, "
                                             "so two models' engines do not share one GIL (a Ray actor is one already)")
    fast_forward: bool = Field(True, description="hf: the lean forward for Llama/Qwen2 models (workers.hf_fast_forward); "
                                                 "false: transformers' own forward")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    replicas: int = Field(1, ge=1)
    engine_args: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")

    @model_validator(mode="after")
    def _hf_only_speculation(self) -> ModelConfig:
        """Drafts made from the target's weights live in the hf worker; vLLM would get the knobs as unknown keys."""
        spec = self.speculative
        if self.backend == "vllm":
            hf_only = [f"method={spec.method}"] if spec.method in ("quantized", "kangaroo") else []
            hf_only += [k for k in ("quantize", "draft_confidence", "draft") if getattr(spec, k) is not None]
            if hf_only:
                raise ValueError(f"speculative {', '.join(hf_only)}: hf backend only (this model's backend is vllm)")
        return self

    def resolved_path(self) -> str:
        return resolve_model_path(self.path)

    def check_available(self) -> None:
        """Refuse, in one line, a hub model that cannot be loaded (local folders are checked on load)."""
        path = self.resolved_path()
        if is_hub_id(path):
            check_hub_model(path)


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


class OnlineConfig(Strict):
    """Online draft adaptation (Online Speculative Decoding) for token-level policies: ``orchestrator.online``."""

    enabled: bool = False
    interval: int = Field(8, ge=1, description="requests with draft misses buffered per update (OSD: 8)")
    steps: int = Field(1, ge=1, description="gradient steps per update (OSD: 1)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (OSD: 1e-4, constant)")
    teacher_top_k: int = Field(20, ge=0, description="the large model's top-k distribution at each miss; 0: its token")
    holdout_every: int = Field(4, ge=2, description="every n-th request is held out to gate the new draft on")
    holdout_requests: int = Field(16, ge=1, description="held-out requests kept (the most recent)")
    buffer_requests: int = Field(64, ge=1, description="buffered requests kept while an update runs")
    tolerance: float = Field(0.0, ge=0, le=1, description="how far acceptance may fall and the new draft is kept")
    live_window: int = Field(2000, ge=0, description="drafted tokens after a swap before its live acceptance is "
                                                     "compared with the previous draft's (0: no live check)")
    threads: int | None = Field(None, ge=1, description="CPU threads of the background training")


class RunConfig(Strict):
    name: str = "run"
    models: dict[str, ModelConfig]
    policy: PolicyConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)

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
    for base in _model_bases():
        if (base / p).exists():
            return str((base / p).resolve())
    if is_hub_id(path):
        return path  # a hub id such as Qwen/QwQ-32B
    raise ConfigError(f"model path {path!r} not found (looked in {_bases_text()}) and is not a hub id")


def is_hub_id(path: str) -> bool:
    """Whether a model path that is not a local folder reads as a hub id (``owner/name``)."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith(".")


def _model_bases() -> list[Path]:
    """Where a relative model path is looked for: the working directory, then the package root (once each)."""
    return list(dict.fromkeys((Path.cwd().resolve(), PACKAGE_ROOT)))


def _bases_text() -> str:
    return " and ".join(str(b) for b in _model_bases())


#: Files whose absence means a folder is not a Hugging Face model: its config and one form of tokenizer.
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: Seconds the start-up check may wait for the hub to say whether a model id exists.
HUB_CHECK_TIMEOUT_S = 10.0


def check_model_folder(folder: str) -> None:
    """Refuse a local folder that is not a model (e.g. ``/etc``) by name, before any loader sees it.

    Loaders fail on such a folder deep inside (a tokenizer converter talks about
    sentencepiece) and never name the path.
    """
    p = Path(folder)
    if not p.is_dir():
        raise ConfigError(f"{folder} is not a model folder (it is a file)")
    missing = [] if (p / MODEL_CONFIG_FILE).is_file() else [MODEL_CONFIG_FILE]
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ConfigError(f"{folder} is not a model folder: it has no {' and no '.join(missing)}")


def check_hub_model(repo_id: str) -> None:
    """Refuse a hub id that cannot be loaded, in at most ``HUB_CHECK_TIMEOUT_S`` and one line.

    Called at start-up, not when a config loads (configs for hub models are validated on
    machines without the hub). A model in the local hub cache is fine; otherwise, offline
    (``HF_HUB_OFFLINE``) is an immediate error and online one metadata request decides,
    where loaders would spend most of a minute on retries before a traceback.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, MODEL_CONFIG_FILE), str):
        return
    where = f"{repo_id!r} is neither a local folder (looked in {_bases_text()}) nor"
    if constants.is_offline_mode():
        raise ConfigError(f"{where} in the hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    try:
        HfApi().model_info(repo_id, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading it needs a token, and the loader says so
    except RepositoryNotFoundError:
        raise ConfigError(f"{where} a model on the hub") from None
    except Exception as e:  # no network, DNS, timeout, server error
        raise ConfigError(f"{where} reachable on the hub ({type(e).__name__}: {e})") from None


def find_config(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", CONFIG_DIR / f"{p}.yml"):
        if cand.is_file():
            return cand
    if p.is_dir():
        raise ConfigError(f"config {str(name_or_path)!r} is a directory, not a YAML file")
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
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own message spans several, with a caret drawing)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
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
            resolved = m.resolved_path()
            if not is_hub_id(resolved):
                check_model_folder(resolved)
        except ConfigError as e:
            raise ConfigError(f"{path}: models.{role}.path: {e}") from None
    return cfg
