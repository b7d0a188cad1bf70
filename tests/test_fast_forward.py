"""The hf engine's lean forward (``workers.hf_fast_forward``) computes what transformers' forward computes."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import arith_model
from workers.hf_backend import HFWorker, growing_cache
from workers.hf_fast_forward import FastForward
from workers.protocol import GenParams


def both(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
         new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill of all but the last ``new`` columns, then of the last ``new`` over that cache, from
    transformers and from the runner (each with its own cache, and its own copy of the model: a dynamic-NTK
    rotary module keeps the frequencies of the longest sequence it saw)."""
    fast = FastForward.build(copy.deepcopy(model))
    assert fast is not None
    out = []
    with torch.inference_mode():
        for run in ("hf", "fast"):
            cache, cut = growing_cache(), ids.shape[1] - new
            for lo, hi in ((0, cut), (cut, ids.shape[1])):
                args = (ids[:, lo:hi], mask[:, :hi], positions[:, lo:hi])
                if run == "hf":
                    logits = model(input_ids=args[0], attention_mask=args[1], position_ids=args[2],
                                   past_key_values=cache, use_cache=True).logits
                else:
                    logits = fast(*args, cache)
            out.append(logits)
    return out[0], out[1]


def padded_batch(vocab: int, width: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (len(pads), width), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def test_logits_match_transformers_on_a_padded_batch_with_a_cache() -> None:
    """The arith large model (Llama layout): left padding, per-row positions, a 5-token step over a cache."""
    model = AutoModelForCausalLM.from_pretrained(arith_model("arith2/large"), dtype=torch.float32).eval()
    ids, mask, positions = padded_batch(model.config.vocab_size, 60, [0, 17, 40])
    want, got = both(model, ids, mask, positions, new=5)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_logits_match_on_qwen2_with_grouped_kv_heads_and_biases() -> None:
    """Qwen2 layout (q/k/v biases, 4 query heads sharing 2 KV heads), random weights."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids, mask, positions = padded_batch(cfg.vocab_size, 40, [0, 9])
    want, got = both(model, ids, mask, positions, new=3)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_from_its_table_or_per_pass_matches_transformers_past_the_tables_first_size(rope) -> None:
    """cos / sin come from a table the rotary module fills (fixed frequencies) or from the module per pass
    (dynamic NTK scales them with the length): a cache of 300 positions then 40 more, past the table's first
    256 rows and the model's 128 trained positions, gives transformers' logits either way."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_scaling=rope)
    model = Qwen2ForCausalLM(cfg).eval()
    assert FastForward.build(model).rope_table is (rope is None or rope["rope_type"] != "dynamic")
    ids, mask, positions = padded_batch(cfg.vocab_size, 340, [0, 31])
    want, got = both(model, ids, mask, positions, new=40)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_batched_decode_step_matches_transformers(grouped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One new position per row over a padded cache, on the matmul attention path (``FastForward._attend``,
    taken from a threshold this small cache is below, lowered here); with query heads sharing KV heads too."""
    monkeypatch.setattr(FastForward, "MATMUL_DECODE_POSITIONS", 1)
    if grouped:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(arith_model("arith2/large"), dtype=torch.float32).eval()
    ids, mask, positions = padded_batch(model.config.vocab_size, 60, [0, 3, 17, 40, 5, 0, 22, 9, 31, 12])
    want, got = both(model, ids, mask, positions, new=1)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_models_the_runner_does_not_cover_keep_transformers_forward() -> None:
    model = AutoModelForCausalLM.from_pretrained(arith_model("arith2/small"), dtype=torch.float32).eval()
    int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert FastForward.build(int8) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    assert FastForward.build(gpt2) is None


async def test_engine_writes_the_same_tokens_with_and_without_the_runner() -> None:
    """Real engines on the arith small model: concurrent requests (batched decode rounds with padding and
    prefix-cache hits) give identical greedy tokens on both paths."""
    path = arith_model("arith2/small")
    lean, plain = HFWorker(path, threads=1), HFWorker(path, threads=1, fast_forward=False)
    assert lean._fast is not None and plain._fast is None
    try:
        tok = lean.tokenizer
        prompts = [tok.encode(t) for t in ("What is 12 + 7 - 3?", "Compute 40 - 12 + 5.", "Solve 3 + 4")]
        params = GenParams(max_tokens=40)
        for _ in range(2):  # the second pass starts from the prefix cache the first left
            a = await asyncio.gather(*(lean.generate(p, params) for p in prompts))
            b = await asyncio.gather(*(plain.generate(p, params) for p in prompts))
            assert [g.token_ids for g in a] == [g.token_ids for g in b]
    finally:
        await lean.close()
        await plain.close()


@pytest.mark.parametrize("keep", [1, 4])
def test_logits_to_keep_reads_the_last_positions(keep: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(arith_model("arith2/small"), dtype=torch.float32).eval()
    fast = FastForward.build(model)
    ids, mask, positions = padded_batch(model.config.vocab_size, 20, [0, 6])
    with torch.inference_mode():
        full = fast(ids, mask, positions, growing_cache())
        last = fast(ids, mask, positions, growing_cache(), keep)
    assert torch.allclose(full[:, -keep:], last, atol=1e-6)


def test_kangaroo_self_draft_runs_on_the_runner_with_transformers_logits() -> None:
    """The self-draft (the target's first layers and an attention-only adapter layer) is covered too."""
    from workers.hf_drafts import KangarooAdapter, self_draft

    target = AutoModelForCausalLM.from_pretrained(arith_model("arith2/large"), dtype=torch.float32).eval()
    torch.manual_seed(0)
    adapter = KangarooAdapter(target, 2)
    for p in adapter.parameters():  # away from the warm start, so a skipped or misread layer shows
        p.data.add_(0.05 * torch.randn_like(p))
    draft = self_draft(target, adapter)
    ids, mask, positions = padded_batch(target.config.vocab_size, 30, [0, 11])
    want, got = both(draft, ids, mask, positions, new=4)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
