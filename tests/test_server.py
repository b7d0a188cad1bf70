"""The OpenAI-compatible server end to end: a real uvicorn server on 127.0.0.1, the official openai client.

One server per config for the whole module (loading models is the slow part). The
configs default to the arith pair's; ``REASONSPEC_SERVER_CONFIGS=arith/small-only``
narrows them. A config whose model folder is missing (not trained yet) is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from evals.arith.problems import random_problem
from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.core import Orchestrator
from orchestrator.prompting import user_message
from orchestrator.server import (
    MAX_BODY_BYTES, MAX_TOKENS_FACTOR, ReasoningSplitter, ServerStats, create_app, server_settings,
)

CONFIGS = os.environ.get("REASONSPEC_SERVER_CONFIGS", "arith-v1/small-only,arith/specreason").split(",")
PROBLEM = "12 + 7 - 3 + 25"
STARTUP_TIMEOUT_S = 300


@dataclass
class Running:
    base_url: str
    app: FastAPI
    model: str
    config: RunConfig

    @property
    def stats(self) -> ServerStats:
        return self.app.state.stats


def _config_or_skip(name: str) -> RunConfig:
    try:
        cfg = load_config(name)
    except ConfigError as e:
        pytest.skip(f"{name}: {e}")
    untrained = [role for role, m in cfg.models.items() if not (Path(m.resolved_path()) / "config.json").exists()]
    if untrained:
        pytest.skip(f"{name}: model folder of {untrained} has no config.json (not trained yet?)")
    return cfg


@pytest.fixture(scope="module", params=CONFIGS)
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    cfg = _config_or_skip(request.param)
    app = create_app(Orchestrator(cfg))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", **server_settings()))  # as `reasonspec serve`
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not srv.started:
        if not thread.is_alive():
            pytest.fail(f"server for {request.param} failed to start (see the log above)")
        if time.monotonic() > deadline:
            pytest.fail(f"server for {request.param} not started after {STARTUP_TIMEOUT_S}s")
        time.sleep(0.1)
    try:
        yield Running(f"http://127.0.0.1:{port}", app, cfg.name, cfg)
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
        sock.close()


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def _ask(problem: str) -> list[dict[str, str]]:
    """A chat turn in the format the arith models were trained on (the server adds no instruction)."""
    return [{"role": "user", "content": user_message(problem)}]


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- answer / reasoning split (no server)


def _split(pieces: list[str]) -> tuple[str, str, str]:
    """(streamed reasoning, final reasoning, answer) of text fed piece by piece."""
    s = ReasoningSplitter()
    streamed = "".join(s.feed(p) for p in pieces)
    tail, answer = s.finish()
    return streamed + tail, s.reasoning, answer


def test_split_without_think_end_answers_with_the_final_step() -> None:
    text = "12 + 7 = 19\n\n19 - 3 = 16\n\nSo the answer is \\boxed{16}."
    assert _split([text]) == (text, text, "So the answer is \\boxed{16}.")


@pytest.mark.parametrize("pieces", [
    ["think hard\n\n</think>\n\nThe answer is \\boxed{4}."],
    ["think hard\n\n</th", "ink>\n\nThe answer is ", "\\boxed{4}."],  # the tag split across segments
    ["think hard\n\n<", "/think>", "\n\nThe answer is \\boxed{4}."],
])
def test_split_at_think_end_whatever_the_segmentation(pieces: list[str]) -> None:
    assert _split(pieces) == ("think hard\n\n", "think hard\n\n", "The answer is \\boxed{4}.")


def test_split_flushes_a_held_back_partial_tag() -> None:
    assert _split(["a < b\n\nso </th"]) == ("a < b\n\nso </th", "a < b\n\nso </th", "so </th")


# ---------------------------------------------------------------- server


def test_health_and_models(server: Running, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [(m.id, m.owned_by) for m in models] == [(server.model, "reasonspec")]


def test_completion(server: Running, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), temperature=0)
    choice = r.choices[0]
    reasoning = choice.message.reasoning_content
    assert "\\boxed{" in choice.message.content
    assert reasoning and reasoning.endswith(choice.message.content)  # arith: the answer is the final step
    assert choice.finish_reason == "stop"
    usage = r.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    ext = usage.reasonspec
    assert ext["policy"] == server.config.policy.type
    assert sum(ext["accepted_tokens"].values()) <= usage.completion_tokens  # rejected drafts count as written
    assert ext["accepted"] <= ext["proposed"] and ext["wall_s"] > 0


def test_text_parts_and_system_messages_are_accepted(server: Running, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=server.model, messages=[
        {"role": "system", "content": [{"type": "text", "text": "You are careful."}]},
        {"role": "user", "content": [{"type": "text", "text": PROBLEM}, {"type": "text", "text": "Box it."}]},
    ], max_completion_tokens=16)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.reasonspec["accepted_tokens"] and sum(r.usage.reasonspec["accepted_tokens"].values()) <= 16


def test_stream_matches_completion(server: Running, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 4
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == whole.choices[0].message.reasoning_content
    assert content == whole.choices[0].message.content
    audit = [d.reasonspec for d in deltas if getattr(d, "reasonspec", None)]
    assert audit and all(a["author"] in server.config.models for a in audit)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # the same accounting: what was accepted is fixed under greedy decoding; all that was written is not, since
    # SpecReason's pipelined next draft is counted when it finished before its step was rejected (a race)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.reasonspec["accepted_tokens"] == whole.usage.reasonspec["accepted_tokens"]
    assert usage.completion_tokens >= sum(usage.reasonspec["accepted_tokens"].values())


@pytest.mark.parametrize("overrides, param", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"temperature": 3.0}, "temperature"),
])
def test_invalid_requests_are_400(server: Running, client: openai.OpenAI, overrides: dict, param: str) -> None:
    kwargs = {"model": server.model, "messages": _ask(PROBLEM), **overrides}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert e.value.body.keys() == {"message", "type", "param", "code"}
    assert e.value.param == param and e.value.type == "invalid_request_error"


def test_token_limit_follows_the_config(server: Running, client: openai.OpenAI) -> None:
    limit = server.config.sampling.max_tokens * MAX_TOKENS_FACTOR
    with pytest.raises(openai.BadRequestError, match=str(limit)):
        client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), max_tokens=limit + 1)


def test_unknown_model_is_404(server: Running, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=_ask(PROBLEM))
    assert e.value.param == "model" and e.value.code == "model_not_found"


def test_oversized_body_is_413(server: Running, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=server.model, messages=_ask("1" * (MAX_BODY_BYTES + 1)))
    assert e.value.status_code == 413 and e.value.code == "request_too_large"


def test_malformed_json_and_unknown_routes_answer_in_openai_shape(server: Running) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.base_url}/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_policy_failure_is_a_500_in_openai_shape(server: Running, client: openai.OpenAI,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(session: object) -> None:
        raise RuntimeError("policy exploded")

    monkeypatch.setattr(server.app.state.orchestrator.policy, "run", broken)
    before = server.stats.failed
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=server.model, messages=_ask(PROBLEM))
    assert e.value.type == "server_error" and "policy exploded" in e.value.message
    with pytest.raises(openai.APIError, match="policy exploded"):  # mid-stream: an error event
        list(client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), stream=True))
    assert server.stats.failed == before + 2


@dataclass
class HangingPolicy:
    """Stands in for the policy: runs until cancelled and says so, so disconnects are tested without races."""

    started: threading.Event
    cancelled: threading.Event

    async def run(self, session: object) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
def hanging(server: Running, monkeypatch: pytest.MonkeyPatch) -> HangingPolicy:
    policy = HangingPolicy(threading.Event(), threading.Event())
    monkeypatch.setattr(server.app.state.orchestrator.policy, "run", policy.run)
    return policy


def _assert_cancelled(server: Running, hanging: HangingPolicy, cancelled_before: int) -> None:
    assert hanging.cancelled.wait(30), "the request's policy task was not cancelled"
    assert _wait_for(lambda: server.stats.cancelled == cancelled_before + 1 and server.stats.active == 0), server.stats


def test_stream_disconnect_cancels_the_request(server: Running, client: openai.OpenAI,
                                               hanging: HangingPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    before = server.stats.cancelled
    stream = client.chat.completions.create(model=server.model, messages=_ask(PROBLEM), stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant" and hanging.started.wait(30)
    stream.close()
    _assert_cancelled(server, hanging, before)
    monkeypatch.undo()  # the real policy again: the server still answers, promptly
    t0 = time.perf_counter()
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert client.chat.completions.create(model=server.model, messages=_ask(PROBLEM)).choices[0].message.content
    print(f"\n[server] request after a disconnect answered in {time.perf_counter() - t0:.2f}s")


def test_plain_request_disconnect_cancels_the_request(server: Running, hanging: HangingPolicy) -> None:
    before = server.stats.cancelled
    body = {"model": server.model, "messages": _ask(PROBLEM)}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1.0))
    assert hanging.started.is_set()
    _assert_cancelled(server, hanging, before)


async def test_concurrent_clients(server: Running, record_property: Callable[[str, object], None]) -> None:
    """64 requests from 16 concurrent clients, all answered; the backends batch them."""
    n_clients, per_client = 16, 4
    rng = random.Random(0)
    problems = [random_problem(rng, "easy").text for _ in range(n_clients * per_client)]

    async def one_client(i: int) -> list[tuple[int, int]]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                      timeout=600) as c:
            answered = []
            for p in problems[i * per_client:(i + 1) * per_client]:
                raw = await c.chat.completions.with_raw_response.create(model=server.model, messages=_ask(p))
                completion = raw.parse()
                assert completion.choices[0].message.reasoning_content
                answered.append((raw.status_code, completion.usage.completion_tokens))
            return answered

    t0 = time.perf_counter()
    answered = [a for per in await asyncio.gather(*(one_client(i) for i in range(n_clients))) for a in per]
    elapsed = time.perf_counter() - t0
    assert [status for status, _ in answered] == [200] * len(problems)
    rps = len(problems) / elapsed
    tokens = sum(n for _, n in answered)
    record_property("requests_per_s", round(rps, 3))
    print(f"\n[server] {server.model}: {len(problems)} requests, {n_clients} clients, {elapsed:.1f}s, "
          f"{rps:.2f} requests/s, {tokens / len(problems):.0f} tokens/request, {tokens / elapsed:.0f} tokens/s, "
          f"load average {json.dumps(os.getloadavg())}")
