"""The second-generation arith tokenizer: byte-level BPE as in Qwen2 and Llama 3.

The pre-tokenizer is Qwen2's regex: letters with one leading non-letter, digits
one per token (``\\p{N}``), punctuation runs *with the newlines after them*,
newline runs. So ``.\\n\\n`` (a step ending, then the step separator) is one
pre-token and BPE merges it as Qwen's and Mistral's vocabularies do: encoding a
chain step by step yields different ids than encoding it whole, the failure mode
a real session meets when it re-encodes text. Saved as a standard fast tokenizer
with a ChatML template whose generation prompt opens a ``<think>`` block.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

from evals.arith.tokenizer import THINK, train_byte_bpe

#: Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen2/Qwen2.5), digits single
PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAD, BOS_TURN, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = train_byte_bpe(corpus, PRETOKENIZE, [PAD, BOS_TURN, EOS], vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[BOS_TURN],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
