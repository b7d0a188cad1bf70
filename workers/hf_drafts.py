"""Drafts made from the target's own weights, inside its hf worker: quantized (ML-SpecQD) and self-drafting (Kangaroo).

Both are served by ``DraftProposer`` exactly like a separate draft model: the draft is an
``HFWorker`` (its own prefix cache, batched rounds) driven from the target's engine thread, and
the target verifies every proposal by "sample, then compare", so output is unchanged. What differs
is only where the draft's network comes from:

- **quantized**: a copy of the target with its ``nn.Linear`` weights cast to int8. On CPU,
  ``torch.ao.quantization.quantize_dynamic`` (per-channel int8 weights, activations quantized on
  the fly; torch's own x86/fbgemm kernels, no extra dependency). On GPU, torchao's
  ``Int8WeightOnlyConfig`` through ``quantize_`` (weight-only int8, the GPU analogue; needs
  ``pip install torchao``). ML-SpecQD's MXFP4 needs Intel's TPP kernels, not available here.
  The multi-level variant is ``speculative.draft``: the quantized draft has a draft of its own.
- **kangaroo**: the target's first ``exit_layer`` decoder layers (the very modules: no copy),
  one adapter layer (norm, self-attention, residual; no MLP), the adapter's final norm and the
  target's LM head. Drafting ends after a token whose top-1 probability is under the threshold
  (Kangaroo's second early exit, ``GenParams.stop_below``), so hard stretches cost short drafts.

  Kangaroo's paper reuses the draft's exited hidden states in the verifying pass (the target skips
  its first layers there). Here the draft keeps its own KV cache and the target's batched decode
  round recomputes those layers: the round is one ``model(...)`` call over rows at different
  positions, and splitting it at the exit layer would take a second forward path through the
  backend. That costs ``exit_layer / num_layers`` of each verifying pass (2/10 on the arith model).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workers.hf_backend import HFWorker
from workers.hf_speculation import DraftProposer
from workers.protocol import WorkerStats, vocab_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Kangaroo's defaults (inference_kangaroo.py and the README command): exit after layer 2, stop under 0.6.
KANGAROO_EXIT_LAYER = 2
KANGAROO_THRESHOLD = 0.6
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FORMAT = "reasonspec-kangaroo-adapter/1"


# ---------------------------------------------------------------- quantized (ML-SpecQD)


def quantized_copy(model: nn.Module, device: torch.device, scheme: str = "int8") -> nn.Module:
    """A copy of ``model`` whose linear layers hold int8 weights; ``model`` itself is untouched."""
    if scheme != "int8":
        raise ValueError(f"speculative.quantize={scheme} is not supported (int8)")
    if device.type == "cpu":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        q = copy.deepcopy(model).float()  # the CPU int8 kernels take float32 activations
        with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            return quantize_dynamic(q, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ValueError("speculative.method=quantized on a GPU needs torchao (pip install torchao)") from e
    q = copy.deepcopy(model)
    quantize_(q, Int8WeightOnlyConfig())
    return q


# ---------------------------------------------------------------- self-drafting (Kangaroo)


class AdapterLayer(nn.Module):
    """Kangaroo's adapter layer: RMSNorm, self-attention, residual; no MLP.

    It takes a decoder layer's call signature, so it stands as the last layer of an ordinary
    ``LlamaModel``-style stack (rotary embeddings, masks and the KV cache are the stack's).
    ``attention_only`` tells the engine's lean forward (``workers.hf_fast_forward``) to skip the MLP.
    """

    attention_only = True

    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                **kwargs: Any) -> torch.Tensor:
        h, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )
        return hidden_states + h


class KangarooAdapter(nn.Module):
    """The trained part of a self-draft: one adapter layer and a final norm.

    Initialised from the target's layer ``exit_layer`` (its attention and input norm) and its
    final norm: a warm start that already maps shallow states towards what the LM head reads.
    """

    def __init__(self, target: PreTrainedModel, exit_layer: int):
        super().__init__()
        layers = decoder_layers(target)
        if not 0 < exit_layer < len(layers):
            raise ValueError(f"exit layer {exit_layer} must be in 1..{len(layers) - 1} for a {len(layers)}-layer target")
        src = layers[exit_layer]
        self.exit_layer = exit_layer
        self.layer = AdapterLayer(copy.deepcopy(src.input_layernorm), copy.deepcopy(src.self_attn))
        self.layer.self_attn.layer_idx = exit_layer  # its slot in the draft's KV cache
        self.norm = copy.deepcopy(target.model.norm)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ValueError(f"{type(model).__name__} is not a decoder stack with model.layers and model.norm "
                         "(Llama, Qwen2, Mistral, ...): Kangaroo cannot exit early from it")
    return inner.layers


def self_draft(target: PreTrainedModel, adapter: KangarooAdapter) -> PreTrainedModel:
    """The draft network: the target's embedding, first layers and LM head around the adapter.

    Built as the target's own class with ``exit_layer + 1`` layers, on the meta device (nothing
    allocated), then every submodule is the target's or the adapter's: weights are shared.
    """
    e = adapter.exit_layer
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = e + 1
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds (Qwen2, ...) follow the cut
        cfg.layer_types = cfg.layer_types[: e + 1]
    with torch.device("meta"):
        draft = type(target)(cfg)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList([*decoder_layers(target)[:e], adapter.layer])
    draft.model.norm = adapter.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    draft.generation_config = target.generation_config
    left = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"self-draft left parts of {type(target).__name__} unbuilt: {left[:5]}")
    return draft.eval()


def save_adapter(adapter: KangarooAdapter, folder: Path, target_path: str, tokenizer: Any, info: dict) -> None:
    """The adapter folder: weights, a config that names what it was trained for, and a card."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(folder / ADAPTER_FILE))
    cfg = {"format": ADAPTER_FORMAT, "exit_layer": adapter.exit_layer, "hidden_size": adapter.norm.weight.shape[0],
           "target": target_path,
           "target_vocab_fingerprint": vocab_fingerprint(tokenizer), **info}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))


def load_adapter(folder: str | Path, target: HFWorker) -> KangarooAdapter:
    """An adapter for ``target``, refused in one line if it was trained for another model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists():
        raise ValueError(f"{folder} is not a Kangaroo adapter folder (no {ADAPTER_CONFIG}); "
                         "train one with `python -m evals.kangaroo_adapter`")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{folder}: unknown adapter format {cfg.get('format')!r}")
    if cfg["target_vocab_fingerprint"] != vocab_fingerprint(target.tokenizer):
        raise ValueError(f"adapter {folder} was trained for {cfg['target']}, whose vocabulary differs "
                         f"from {target.model_path}")
    hidden = target.model.config.hidden_size
    if cfg["hidden_size"] != hidden or cfg["exit_layer"] >= len(decoder_layers(target.model)):
        raise ValueError(f"adapter {folder} (hidden {cfg['hidden_size']}, exit after layer {cfg['exit_layer']}) "
                         f"does not fit {target.model_path} (hidden {hidden}, "
                         f"{len(decoder_layers(target.model))} layers): it was trained for {cfg['target']}")
    adapter = KangarooAdapter(target.model, cfg["exit_layer"])
    try:
        adapter.load_state_dict(load_file(str(folder / ADAPTER_FILE)))
    except RuntimeError as e:  # shapes of another model
        raise ValueError(f"adapter {folder} does not fit {target.model_path}: {e}") from None
    return adapter.to(target.device, next(target.model.parameters()).dtype).eval()


# ---------------------------------------------------------------- building and reporting


def derived_draft(spec: Any, target: HFWorker) -> DraftProposer:
    """The proposer of ``speculative.method`` quantized or kangaroo, drafting with ``target``'s weights."""
    common = dict(device=str(target.device), kv_cache_tokens=target.cache.max_tokens, speculative=spec.draft)
    k = spec.num_speculative_tokens
    if spec.method == "quantized":
        if spec.model:
            raise ValueError("speculative.method=quantized drafts with the target's own weights and takes no "
                             "model; a smaller draft below it goes in speculative.draft")
        model = quantized_copy(target.model, target.device, spec.quantize or "int8")
        return DraftProposer(HFWorker(target.model_path, model=model, **common), k, stop_below=spec.draft_confidence,
                             label=f"{spec.quantize or 'int8'} copy of {target.model_path}")
    if spec.method == "kangaroo":
        if not spec.model:
            raise ValueError("speculative.method=kangaroo needs speculative.model (the adapter folder)")
        model = self_draft(target.model, load_adapter(spec.model, target))
        stop = spec.draft_confidence if spec.draft_confidence is not None else KANGAROO_THRESHOLD
        return DraftProposer(HFWorker(target.model_path, model=model, **common), k, stop_below=stop,
                             label=f"first {model.config.num_hidden_layers - 1} layers of {target.model_path} "
                                   f"+ adapter {spec.model}")
    raise ValueError(f"no derived draft for speculative.method={spec.method}")


def draft_levels(worker: HFWorker) -> list[dict]:
    """Per draft level below ``worker`` (one, or more for multi-level): how its drafts fared.

    ``drafts`` counts proposals, each verified in one pass of the level above (the draft serves
    one request per proposal); ``accepted`` is what that level kept, from its own stats;
    ``early_stops`` the proposals the draft ended where it doubted itself (``GenParams.stop_below``).
    """
    out, above = [], worker
    while (draft := getattr(proposer := above.speculator, "draft", None)) is not None:
        s: WorkerStats = above._stats
        drafts = draft._stats.requests
        out.append({
            "draft": proposer.label, "drafts": drafts,
            "proposed": s.spec_proposed_tokens, "accepted": s.spec_accepted_tokens,
            "acceptance": s.spec_accepted_tokens / s.spec_proposed_tokens if s.spec_proposed_tokens else 0.0,
            "accepted_per_draft": s.spec_accepted_tokens / drafts if drafts else 0.0,
            "early_stops": draft._stats.confidence_stops,
        })
        above = draft
    return out
