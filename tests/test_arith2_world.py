"""The policies on the second-generation arith models, whose tokenizer merges across step boundaries.

Encoding this world's reasoning step by step gives other ids than encoding it whole (``.\\n\\n`` is one
token, as in Qwen's and Llama 3's vocabularies), so a session that re-derived ids from text would feed the
models contexts they never wrote and, under greedy decoding, drift from their own text. These tests pin that
every policy writes exactly the text its models wrote: step-level policies that keep every small step give
SmallOnly's text, lossless speculative decoding and Consultant Decoding at epsilon -> 0 give LargeOnly's.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from evals.arith.problems import ArithGenerator
from evals.arith2.chains import STEP_SEP

from tests.conftest import solve_all

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROBLEMS = [p.text for p in ArithGenerator("test", "medium", seed=0).take(3)]
NEVER_A_CUE = ["policy.reflection=[]", "policy.verification=[]", "policy.affirmation=[]"]


@pytest.fixture(scope="module")
def pair(engines):
    return {"small": engines("hf", "arith2/small"), "large": engines("hf", "arith2/large")}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def baselines(pair):
    return {name: await solve_all(pair, f"arith/{name}-only", PROBLEMS) for name in ("small", "large")}


def texts(results) -> list[str]:
    return [r.text for r in results]


async def test_step_boundaries_merge_so_ids_are_not_re_derivable_from_steps(pair, baselines):
    tok = pair["small"].tokenizer
    sep = tok.encode(STEP_SEP, add_special_tokens=False)
    for r in baselines["small"]:
        steps = r.text.split(STEP_SEP)
        stepwise = [t for k, s in enumerate(steps) for t in tok.encode(s, add_special_tokens=False) + sep[: k < len(steps) - 1 and len(sep)]]
        # the model wrote ".\n\n" as one token: steps and delimiters encoded apart give other (more) ids
        assert len(steps) >= 5 and len(stepwise) > len(tok.encode(r.text, add_special_tokens=False))


async def test_specreason_keeping_every_step_writes_the_small_models_text(pair, baselines):
    results = await solve_all(pair, "arith/specreason", PROBLEMS, ["policy.threshold=0"])
    assert texts(results) == texts(baselines["small"])
    assert all(len([s for s in r.segments if s.author == "small"]) >= 5 for r in results)  # one judged step each


async def test_spec_thinking_without_cues_writes_the_small_models_text(pair, baselines):
    results = await solve_all(pair, "arith/spec-thinking", PROBLEMS, NEVER_A_CUE)
    assert texts(results) == texts(baselines["small"])


async def test_spec_thinking_hands_over_at_the_small_models_own_cues(pair, baselines):
    results = await solve_all(pair, "arith/spec-thinking", PROBLEMS)
    assert sum(r.metrics.handoffs for r in results) > 0
    for r in results:
        assert r.text == "".join(s.text for s in r.segments if s.accepted)


async def test_token_level_policies_at_their_limits_write_one_models_text(pair, baselines):
    assert texts(await solve_all(pair, "arith/speculative", PROBLEMS)) == texts(baselines["large"])
    assert texts(await solve_all(pair, "arith/consultant", PROBLEMS, ["policy.epsilon=1e-9"])) == texts(baselines["large"])
    lax = await solve_all(pair, "arith/consultant", PROBLEMS, ["policy.epsilon=1e9"])  # every draft token kept (+ the bonus)
    assert all(r.metrics.accepted == r.metrics.proposed > 0 for r in lax)
