"""The arith pair's tokenizer: a byte-level BPE with single-digit tokens.

Digits are always single tokens (models learn arithmetic far faster that way) and
the step separator ``\\n\\n`` is isolated, so merges never cross a step boundary:
tokenizing steps one by one gives the same ids as tokenizing the whole trace.
Saved with ``save_pretrained`` as a standard fast tokenizer with a chat template
in the style of reasoning models (role tokens, a ``<think>`` block).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
THINK = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|><think>\\n' }}{%- endif -%}"
)


def train_byte_bpe(corpus: Iterable[str], split: str, special: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``corpus``; ``split`` is the pre-tokenizer's regex (its matches isolated).

    Shared by both arith worlds, which differ in that regex, their special tokens
    and chat template; the ``<think>`` tags are added after training.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens(THINK)
    return tok


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_bpe(corpus, r"\d|\n\n", SPECIAL, vocab_size),
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
