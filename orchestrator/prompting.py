"""How a problem becomes the token ids a model is prompted with.

The chat template is applied once per request and model, through the tokenizer of
the model that is asked; the same instruction is used by training data (the arith
pair), evals and the server, so every model sees exactly what it was trained on.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

Messages = list[dict[str, str]]


def user_message(problem: str, instruction: str | None = INSTRUCTION) -> str:
    """The user turn for a problem: problem first, then the instruction (R1/QwQ style)."""
    return f"{problem.strip()}\n{instruction}" if instruction else problem.strip()


def to_messages(problem: str | Messages, instruction: str | None = INSTRUCTION, system: str | None = None) -> Messages:
    if isinstance(problem, str):
        msgs = [{"role": "user", "content": user_message(problem, instruction)}]
        return ([{"role": "system", "content": system}] if system else []) + msgs
    if not problem or not all(isinstance(m, dict) and "role" in m and "content" in m for m in problem):
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    return list(problem)


def chat_text(tokenizer: Any, messages: Messages) -> str:
    """The prompt as text: the chat template applied, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    return tokenizer.encode(chat_text(tokenizer, messages), add_special_tokens=False)


def problem_text(problem: str | Messages) -> str:
    """A printable form of the problem (the last user turn for chat input)."""
    if isinstance(problem, str):
        return problem
    return next((m["content"] for m in reversed(problem) if m["role"] == "user"), "")
