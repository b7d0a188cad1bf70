"""The hf backend computes logits only for the positions a request reads (issue 15, item 3)."""

from __future__ import annotations

from typing import Any

from workers.protocol import GenParams


async def test_logits_only_for_the_positions_a_request_reads(engines: Any) -> None:
    worker = engines("hf", "small")
    seen: list[int] = []
    forward = worker.model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        seen.append(out.logits.shape[1])
        return out

    worker.model.forward = recording
    try:
        prompt = [5 + (i % 200) for i in range(700)]  # a long uncached prompt
        await worker.generate(prompt, GenParams(max_tokens=1))
        assert seen[0] == 1  # a 700-token prefill reads one row of logits, not 700
        seen.clear()
        s = await worker.score(prompt[:600], prompt[600:], sample=GenParams())
        assert len(s.logprobs) == 100 and len(s.sampled) == 101
        assert seen == [101]  # the continuation and the position after it
    finally:
        worker.model.forward = forward
