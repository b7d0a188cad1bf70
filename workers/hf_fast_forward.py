"""A lean forward pass for Llama-layout decoders (Llama, Qwen2): the hf engine's fast path.

Why: at the sizes this project runs on a CPU, a transformers forward pass costs mostly Python, not
arithmetic. Profiled on the arith world (``evals.profile_threads``, CPU time per engine thread), a
decode step of the 2-layer small model spent ~45% of its time outside the layers (a 4D mask built
from the 2D one, output-capturing wrappers, config lookups), and each layer ~30 module calls with
their hooks for ~12 tensor operations of work. A real GPU deployment hides the same per-operation
cost behind CUDA graphs (vLLM); here the engine runs the same arithmetic on the same weights (by
reference: no copy) in about 20 tensor operations per layer: ``F.linear`` and ``F.rms_norm``
without module calls, one additive mask per pass shared by every layer, and cos / sin from the
model's own rotary module (so every RoPE variant transformers implements stays right): read from a
table it filled once where its frequencies do not depend on the sequence's length, computed per pass
where they do (dynamic NTK, LongRoPE). Each operation here is worth its cost: a decode step of the
small arith model takes ~0.5 ms, ~5 us an operation (see ``_rms`` and ``_rotate``).

The KV cache is the transformers ``Cache`` the engine already keeps (``Cache.update`` per layer),
so prefix caching, stacking and unstacking are unchanged. Kangaroo's self-draft (the target's
first layers and an attention-only adapter layer, ``workers.hf_drafts``) runs here too. Logits
match transformers' own forward to float tolerance, and greedy output is identical (``tests/test_fast_forward.py``). A model this
runner does not cover (another architecture, quantized or adapted projections, sliding windows,
biased MLPs) returns None from ``FastForward.build`` and keeps transformers' path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

SUPPORTED = {"LlamaForCausalLM": "LlamaDecoderLayer", "Qwen2ForCausalLM": "Qwen2DecoderLayer"}


class _Layer:
    """One decoder layer's weights (references: the model's parameters stay the only copy).

    A layer that declares ``attention_only`` (Kangaroo's adapter: norm, attention, residual) has no MLP.
    """

    def __init__(self, layer: torch.nn.Module):
        att = layer.self_attn
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.mlp = not getattr(layer, "attention_only", False)
        if self.mlp:
            mlp = layer.mlp
            self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            post = layer.post_attention_layernorm
            self.norm2, self.eps2 = post.weight, post.variance_epsilon


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As LlamaRMSNorm: normalised in float32, cast back, then scaled.

    In float32 the casts are no-ops and ``F.rms_norm``'s own weight gives the same numbers in
    one operation (10.4 against 13.0 us on a decode step's row, measured on this CPU).
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, for ``_rotate``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' ``x * cos + rotate_half(x) * sin``, the same numbers in four operations instead of
    seven: ``rotate_half(x)`` is ``x`` rolled by half its width with its first half negated, and the negation
    is moved onto ``sin`` once per pass (``_signed``; exact in floating point). 12.2 -> 7.0 us a call."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(signed_sin))


class FastForward:
    """``model``'s forward pass as a few tensor operations per layer (same weights, same cache)."""

    def __init__(self, model: torch.nn.Module):
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        rope = getattr(self.rotary, "rope_type", "default")
        self.rope_table = "dynamic" not in rope and rope != "longrope"  # frequencies fixed for every length
        self._cos: torch.Tensor | None = None  # (positions, head_dim), from the rotary module
        self._sin: torch.Tensor | None = None  # signed (``_signed``)
        self.norm, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.lm_head.weight
        self.layers = [_Layer(layer) for layer in inner.layers]
        att = inner.layers[0].self_attn
        self.head_dim = att.head_dim
        self.scale = att.scaling
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads

    @classmethod
    def build(cls, model: torch.nn.Module) -> FastForward | None:
        """The runner for ``model``, or None where its forward holds something this runner does not do."""
        cfg = model.config
        layer_class = SUPPORTED.get(type(model).__name__)
        if layer_class is None or getattr(cfg, "hidden_act", None) != "silu":
            return None
        if any(type(layer).__name__ != layer_class and not getattr(layer, "attention_only", False)
               for layer in model.model.layers):
            return None  # a layer replaced by something this runner does not know
        if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "mlp_bias", False):
            return None
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            return None
        linear = [m for layer in model.model.layers for m in layer.modules() if "Linear" in type(m).__name__]
        if any(type(m) is not torch.nn.Linear for m in linear + [model.lm_head]):
            return None  # quantized or adapted projections run their own forward
        if any(type(p.data) is not torch.Tensor for p in model.parameters()):
            return None  # weight-only quantized tensors (torchao) dispatch their own matmuls
        return cls(model)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Cache, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (all when 0); ``cache`` grows by the new positions.

        ``attention_mask`` covers the cached and the new positions (1: attend), as transformers takes it.
        """
        B, N = input_ids.shape
        h = F.embedding(input_ids, self.embed)
        cos, sin = self._rope(h, position_ids, attention_mask.shape[1])
        cos, sin = cos[:, None], sin[:, None]
        mask = self._mask(attention_mask, N, h.dtype)
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        for i, lay in enumerate(self.layers):
            x = _rms(h, lay.norm1, lay.eps1)
            q = _rotate(F.linear(x, lay.q.weight, lay.q.bias).view(B, N, H, D).transpose(1, 2), cos, sin)
            k = _rotate(F.linear(x, lay.k.weight, lay.k.bias).view(B, N, KV, D).transpose(1, 2), cos, sin)
            v = F.linear(x, lay.v.weight, lay.v.bias).view(B, N, KV, D).transpose(1, 2)
            k, v = cache.update(k, v, i)
            a = self._attend(q, k, v, mask)
            h = h + F.linear(a.transpose(1, 2).reshape(B, N, H * D), lay.o.weight, lay.o.bias)
            if lay.mlp:
                x = _rms(h, lay.norm2, lay.eps2)
                h = h + F.linear(F.silu(F.linear(x, lay.gate)) * F.linear(x, lay.up), lay.down)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return F.linear(_rms(h, self.norm, self.eps), self.head)

    def _rope(self, h: torch.Tensor, position_ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, N, head_dim) at ``position_ids``, which are under ``width`` (the mask's width:
        a position counts the tokens its row attends before it).

        With fixed frequencies, rows of a table the rotary module filled for every position up to twice the
        longest seen: the module computes each position's values on their own (an outer product, then cos
        and sin), so the rows are the numbers it would return.
        """
        if not self.rope_table:
            cos, sin = self.rotary(h, position_ids)
            return cos, _signed(sin)
        if self._cos is None or width > self._cos.shape[0] or self._cos.dtype != h.dtype \
                or self._cos.device != h.device:
            n = max(width, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            cos, sin = self.rotary(h, torch.arange(n, device=h.device)[None])
            self._cos, self._sin = cos[0], _signed(sin[0])
        return self._cos[position_ids], self._sin[position_ids]

    #: Cached positions over all rows (rows x positions) from which a decode step's attention goes through two
    #: matmuls on a CPU (``_attend``).
    MATMUL_DECODE_POSITIONS = 4096

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of the new positions' queries over the cache, (B, H, N, D).

        A decode step on a CPU (one query per row) over ``MATMUL_DECODE_POSITIONS`` cached positions or
        more in all rows runs as two matmuls and a softmax, since torch's CPU SDPA kernel walks one query
        per row slowly. Measured on one thread with the arith large model's heads: 32 rows x 400-1000
        positions 0.38-2.08 ms a layer call against 0.33-1.65 ms for the matmuls, one row at 32k positions
        1.71 against 1.23 ms, 4 rows at 8k 1.67 against 1.07 ms; equal around 5k positions in all (8 rows
        x 600, 16 x 300); SDPA ahead below that (4 rows x 600: 0.077 against 0.082 ms; one row at 300-1000:
        0.03-0.06 against 0.05-0.07 ms) and for several queries per row (a 9-token verification at 32k:
        5.3 against 8.8 ms). The query heads that share a KV head form one matrix, so grouped KV heads are
        never repeated. Elsewhere (prefill, verification, short caches, GPUs): SDPA.
        """
        B, H, N, D = q.shape
        if N != 1 or B * k.shape[2] < self.MATMUL_DECODE_POSITIONS or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.kv_heads != H)
        KV = self.kv_heads
        scores = torch.matmul(q.view(B, KV, H // KV, D), k.transpose(-1, -2)).mul_(self.scale)
        if mask is not None:  # (B, 1, 1, positions): padding and holes; each row keeps its own position
            scores.add_(mask)
        return torch.matmul(torch.softmax(scores, -1), v).view(B, H, 1, D)

    @staticmethod
    def _mask(attention_mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive mask (B, 1, n, total; 0 or -inf) for every layer: causal over the new positions, padding
        dropped. Additive because SDPA turns a boolean mask into one in every call (a 9-token verification over
        1,500 positions: 138 against 126 us a layer, the same numbers).

        A query whose every key is masked (a padding position) attends to itself, so its row stays finite:
        its output is never read, but a NaN in its key or value would reach real rows through 0 * NaN.
        """
        total = attention_mask.shape[1]
        if n == 1 and bool(attention_mask.all()):
            return None  # one new position that sees everything: no mask at all
        past = total - n
        cols = torch.arange(total, device=attention_mask.device)
        rows = past + torch.arange(n, device=attention_mask.device)
        allowed = (cols[None, :] <= rows[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        allowed = allowed | (cols[None, :] == rows[:, None])[None, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
