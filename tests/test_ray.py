"""The Ray layer: actor placement plans, ReplicaSet routing, RayWorker on the real arith
models, fault tolerance when an actor's process dies, and a job submitted to a
``ray start`` cluster.

Tests that need Ray are marked ``ray`` and share one local Ray instance per session
(``ray.init(address="local", num_cpus=4)``: small enough for a 2-core machine,
enough logical CPUs for a few one-CPU actors). Plans and routing are tested
without Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import ray
from ray.exceptions import RayActorError

from evals.arith.problems import ArithGenerator
from orchestrator import ray_pool
from orchestrator.config import PACKAGE_ROOT, ConfigError, ModelConfig, RunConfig, load_config
from orchestrator.core import Orchestrator
from orchestrator.pool import create_local_worker
from orchestrator.prompting import prompt_ids, to_messages
from workers.protocol import GenParams, Worker, WorkerError, WorkerStats
from workers.ray_worker import RayWorker, ReplicaSet, WorkerTimeoutError

SMALL = PACKAGE_ROOT / "evals/arith/models/small"
PROBLEMS = [p.text for p in ArithGenerator(split="test", seed=7).take(16)]


def _config(**overrides: object) -> RunConfig:
    return load_config("arith-v1/small-only", {"ray.address": "local", **overrides})


def _prompt(tokenizer: object, problem: str) -> list[int]:
    return prompt_ids(tokenizer, to_messages(problem))


def _assert_dead(worker: RayWorker) -> None:
    """The worker's actor is gone (``ray.kill`` is asynchronous: a call right after it may still be served)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ray.get(worker.actor.pid.remote(), timeout=30)
        except RayActorError:
            return
        time.sleep(0.5)
    pytest.fail(f"{worker.name}: the actor is still alive after close()")


# ---------------------------------------------------------------- placement plans (no Ray)


def test_plan_cpu_model_runs_on_cpu_with_capped_threads() -> None:
    cfg = ModelConfig(path=str(SMALL.parent), placement={"num_cpus": 2, "max_concurrency": 64})
    plan = ray_pool.plan_actor(cfg)
    assert plan.options == {
        "num_cpus": 2, "num_gpus": 0, "resources": {}, "max_restarts": 1, "max_task_retries": 1,
        "max_concurrency": 64,
    }
    assert plan.bundles is None and plan.cpus == 2
    assert plan.model.device == "cpu"  # Ray 2.60 does not hide GPUs from a zero-GPU actor
    assert plan.model.threads == 2  # torch's threads capped to the actor's CPUs
    assert ray_pool.plan_actor(cfg.model_copy(update={"threads": 1})).model.threads == 1  # unless configured


def test_plan_gpu_model_uses_the_gpu_ray_assigns() -> None:
    cfg = ModelConfig(path=str(SMALL.parent), device="cuda:3", placement={"num_gpus": 1, "resources": {"a100": 1}})
    plan = ray_pool.plan_actor(cfg)
    assert plan.options["num_gpus"] == 1 and plan.options["resources"] == {"a100": 1}
    assert plan.model.device == "cuda"  # cuda:0 of the actor's CUDA_VISIBLE_DEVICES


def test_plan_without_restarts_does_not_retry() -> None:
    plan = ray_pool.plan_actor(ModelConfig(path=str(SMALL.parent), placement={"max_restarts": 0}))
    assert plan.options["max_restarts"] == 0 and plan.options["max_task_retries"] == 0


def test_plan_tensor_parallel_reserves_a_placement_group() -> None:
    cfg = ModelConfig(
        path=str(SMALL.parent), backend="vllm", tensor_parallel_size=4, engine_args={"enforce_eager": True},
        placement={"num_cpus": 2, "num_gpus": 1, "resources": {"a100": 1}},
    )
    plan = ray_pool.plan_actor(cfg)
    assert plan.bundles == [{"GPU": 1, "CPU": 2, "a100": 1}] + [{"GPU": 1, "CPU": 1}] * 3
    assert plan.options["num_gpus"] == 0 and plan.options["num_cpus"] == 2
    assert plan.model.engine_args == {"distributed_executor_backend": "ray", "enforce_eager": True}
    assert plan.cpus == 5
    with pytest.raises(ConfigError, match="needs backend: vllm"):
        ray_pool.plan_actor(cfg.model_copy(update={"backend": "hf"}))


# ---------------------------------------------------------------- ReplicaSet routing (no Ray)


class _Fake:
    """A stand-in worker: records the prompts it served and returns fixed stats."""

    def __init__(self, i: int):
        self.i = i
        self.seen: list[list[int]] = []
        self.closed = False

    async def generate(self, prompt_ids: list[int], params: GenParams) -> int:
        self.seen.append(prompt_ids)
        return self.i

    async def stats(self) -> WorkerStats:
        return WorkerStats(requests=len(self.seen), generated_tokens=10 * (self.i + 1), busy_s=0.5)

    async def close(self) -> None:
        self.closed = True


async def test_replica_set_spreads_sessions_and_keeps_them_on_their_replica() -> None:
    fakes = [_Fake(0), _Fake(1)]
    rs = ReplicaSet(fakes)
    params = GenParams(max_tokens=1)
    sessions = [[7, 8, s] for s in range(6)]
    first = [await rs.generate(p, params) for p in sessions]
    assert sorted(first) == [0, 0, 0, 1, 1, 1]  # new sessions alternate while loads are equal
    for _ in range(3):  # each session's prompt grows by a step: it stays where its cache is
        sessions = [p + [9] * 30 for p in sessions]
        assert [await rs.generate(p, params) for p in sessions] == first
    stats = await rs.stats()
    assert stats.requests == 24 and stats.generated_tokens == 30 and stats.busy_s == 1.0
    await rs.close()
    assert all(f.closed for f in fakes)


def test_replica_set_leaves_an_overloaded_replica() -> None:
    rs = ReplicaSet([_Fake(0), _Fake(1)], max_imbalance=2)
    session = list(range(100))
    home = rs.route(session)
    rs.outstanding[home] = 2
    assert rs.route(session + [1]) == home  # within the allowed imbalance: keep the cache
    rs.outstanding[home] = 3
    other = rs.route(session + [2])
    assert other != home
    rs.outstanding[home] = 0
    assert rs.route(session + [3]) == other  # the session has moved: it follows its new cache


# ---------------------------------------------------------------- on a local Ray instance


@pytest.fixture(scope="session")
def small_model() -> Path:
    if not (SMALL / "config.json").exists():
        pytest.skip(f"the arith small model is not trained yet ({SMALL})")
    return SMALL


@pytest.fixture(scope="session")
def ray_cluster(small_model: Path) -> Iterator[None]:
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reasonspec-tests")
    yield
    ray.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def small_local(small_model: Path) -> AsyncIterator[Worker]:
    """The small model in this process: the reference every Ray result is compared with."""
    worker = create_local_worker(_config().models["small"])
    yield worker
    await worker.close()


@pytest.fixture(scope="session")
def tokenizer(small_model: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_model)


@pytest.mark.ray
async def test_ray_worker_matches_the_in_process_worker(ray_cluster: None, small_local: Worker,
                                                        tokenizer: object) -> None:
    w = (await ray_pool.start_ray_workers(_config(), ("small",)))["small"]
    try:
        assert isinstance(w, RayWorker) and isinstance(w, Worker)
        remote, local = await w.info(), await small_local.info()
        assert remote.process != local.process  # the actor's own process
        assert remote.model_copy(update={"process": None}) == local.model_copy(update={"process": None})
        ids = _prompt(tokenizer, PROBLEMS[0])
        params = GenParams(max_tokens=24, logprobs=3)
        got, want = await w.generate(ids, params), await small_local.generate(ids, params)
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.top.keys() == b.top.keys()
        cont = want.token_ids
        s_got = await w.score(ids, cont, top_k=3, entropies=True)
        s_want = await small_local.score(ids, cont, top_k=3, entropies=True)
        assert s_got.logprobs == pytest.approx(s_want.logprobs, abs=1e-4)
        assert s_got.entropies == pytest.approx(s_want.entropies, abs=1e-4)
        assert [t.keys() for t in s_got.top] == [t.keys() for t in s_want.top]
        digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
        n_got = await w.next_token_logprobs(ids + cont, digits, top_k=4)
        n_want = await small_local.next_token_logprobs(ids + cont, digits, top_k=4)
        assert n_got.candidates.keys() == n_want.candidates.keys() and list(n_got.top) == list(n_want.top)
        assert list(n_got.candidates.values()) == pytest.approx(list(n_want.candidates.values()), abs=1e-4)
        stats = await w.stats()
        assert stats.requests == 3 and stats.generated_tokens == 24
        with pytest.raises(WorkerError, match="small model .*generate failed: generate needs a non-empty prompt"):
            await w.generate([], params)
    finally:
        await w.close()
    _assert_dead(w)
    with pytest.raises(WorkerError, match="closed"):
        await w.stats()


@pytest.mark.ray
async def test_replicas_spread_requests_and_sum_stats(ray_cluster: None, tokenizer: object) -> None:
    rs = (await ray_pool.start_ray_workers(_config(**{"models.small.replicas": 2}), ("small",)))["small"]
    try:
        assert isinstance(rs, ReplicaSet) and len(rs.replicas) == 2
        assert len({await r.pid() for r in rs.replicas}) == 2
        params = GenParams(max_tokens=8)
        prompts = [_prompt(tokenizer, p) for p in PROBLEMS[:8]]
        gens = await asyncio.gather(*(rs.generate(p, params) for p in prompts))
        per_replica = [await r.stats() for r in rs.replicas]
        assert [s.requests for s in per_replica] == [4, 4]
        # each session's next step goes to the replica that served its first one
        before = [s.requests for s in per_replica]
        await rs.generate(prompts[0] + gens[0].token_ids, params)
        after = [(await r.stats()).requests for r in rs.replicas]
        home = [a - b for a, b in zip(after, before)].index(1)
        assert rs.route(prompts[0] + gens[0].token_ids + [5]) == home
        total = await rs.stats()
        assert total.requests == 9 and total.generated_tokens == 72
        assert total.forward_passes == sum([(await r.stats()).forward_passes for r in rs.replicas])
    finally:
        await rs.close()
    for r in rs.replicas:
        _assert_dead(r)


@pytest.mark.ray
@pytest.mark.vllm
async def test_vllm_worker_in_a_ray_actor(ray_cluster: None, small_local: Worker, tokenizer: object) -> None:
    """The actor hosts any backend: a vLLM engine (it spawns its own processes) inside the actor's process."""
    pytest.importorskip("vllm")
    w = (await ray_pool.start_ray_workers(_config(**{"models.small.backend": "vllm"}), ("small",)))["small"]
    try:
        assert (await w.info()).backend == "vllm"
        ids, params = _prompt(tokenizer, PROBLEMS[1]), GenParams(max_tokens=24)
        assert (await w.generate(ids, params)).token_ids == (await small_local.generate(ids, params)).token_ids
    finally:
        await w.close()
    _assert_dead(w)


async def _kill_mid_flight(w: RayWorker, calls: list) -> tuple[list, list[bool]]:
    """Start ``calls`` and SIGKILL the actor's process while they run: (outcomes, which were running at the kill).

    The kill comes as soon as the actor starts serving them (its request counter moves),
    not after a fixed sleep, which a fast model on an idle machine could outrun.
    """
    pid, served = await w.pid(), (await w.stats()).requests
    tasks = [asyncio.ensure_future(c) for c in calls]
    async with asyncio.timeout(120):
        while (await w.stats()).requests == served:
            await asyncio.sleep(0.005)
    running = [not t.done() for t in tasks]
    os.kill(pid, signal.SIGKILL)  # the actor's process only: this test started it
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)  # none may hang
    assert any(running), "every call finished before the kill: the test needs longer calls"
    return outcomes, running


@pytest.mark.ray
async def test_actor_killed_mid_request_is_restarted_and_calls_retried(ray_cluster: None, tokenizer: object) -> None:
    w = (await ray_pool.start_ray_workers(_config(), ("small",), call_timeout_s=240))["small"]
    try:
        params = GenParams(max_tokens=400)
        prompts = [_prompt(tokenizer, p) for p in PROBLEMS]
        expected = await asyncio.gather(*(w.generate(p, params) for p in prompts))
        old_pid = await w.pid()
        outcomes, running = await _kill_mid_flight(w, [w.generate(p, params) for p in prompts])
        retried = 0
        for got, want, was_running in zip(outcomes, expected, running):
            if isinstance(got, BaseException):
                assert isinstance(got, WorkerError) and "small model" in str(got), got
            else:
                assert got.token_ids == want.token_ids
                retried += was_running
        assert retried > 0, "no call in flight at the kill was completed by the restarted actor"
        assert await w.pid() != old_pid  # restarted by Ray, and serving again
        again = await w.generate(prompts[0], params)
        assert again.token_ids == expected[0].token_ids
    finally:
        await w.close()


@pytest.mark.ray
async def test_actor_out_of_restarts_fails_calls_cleanly(ray_cluster: None, tokenizer: object) -> None:
    cfg = _config(**{"models.small.placement.max_restarts": 0})
    w = (await ray_pool.start_ray_workers(cfg, ("small",)))["small"]
    try:
        params = GenParams(max_tokens=400)
        outcomes, running = await _kill_mid_flight(w, [w.generate(_prompt(tokenizer, p), params) for p in PROBLEMS])
        for outcome, was_running in zip(outcomes, running):
            if was_running:
                assert isinstance(outcome, WorkerError) and "actor died during generate" in str(outcome), outcome
        t0 = time.perf_counter()
        with pytest.raises(WorkerError, match="small model .*actor died"):
            await w.generate(_prompt(tokenizer, PROBLEMS[0]), params)
        assert time.perf_counter() - t0 < 30
    finally:
        await w.close()


@pytest.mark.ray
async def test_orchestrator_on_ray_survives_a_killed_actor(ray_cluster: None, arith_small: Orchestrator) -> None:
    """Same answers as in-process; a worker killed mid-eval costs at most the problems in flight."""
    orch = Orchestrator.from_config("arith-v1/small-only", overrides={"ray.address": "local"})
    try:
        await orch.start()
        worker = orch.models["small"].worker
        assert isinstance(worker, RayWorker)
        local = await asyncio.gather(*(arith_small.asolve(p) for p in PROBLEMS[:4]))
        remote = await asyncio.gather(*(orch.asolve(p) for p in PROBLEMS[:4]))
        assert [r.text for r in remote] == [r.text for r in local]
        outcomes, _ = await _kill_mid_flight(worker, [orch.asolve(p) for p in PROBLEMS])
        for o in outcomes:
            assert not isinstance(o, BaseException) or isinstance(o, WorkerError), o
        after = await orch.asolve(PROBLEMS[0])  # the eval goes on
        assert after.text == local[0].text
    finally:
        await orch.aclose()
    _assert_dead(worker)


@pytest.mark.ray
async def test_failed_start_up_tears_everything_down(ray_cluster: None, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[RayWorker] = []

    def recording_launch(*args: object, **kwargs: object) -> RayWorker:
        launched.append(real_launch(*args, **kwargs))
        return launched[-1]

    real_launch = ray_pool.launch
    monkeypatch.setattr(ray_pool, "launch", recording_launch)
    cfg = _config()
    cfg.models["large"] = cfg.models["small"].model_copy(update={"path": "/nonexistent/model"})
    with pytest.raises(WorkerError, match="large model /nonexistent/model: its Ray actor failed to start: .*exist"):
        await ray_pool.start_ray_workers(cfg, ("small", "large"))
    assert len(launched) == 2
    for w in launched:
        _assert_dead(w)

    # a tensor-parallel model that cannot be placed (no GPUs here) times out instead of hanging
    launched.clear()
    cfg.models["large"] = cfg.models["small"].model_copy(update={"backend": "vllm", "tensor_parallel_size": 2})
    with pytest.raises(WorkerTimeoutError, match=r"large model .*not ready within 3s; .* \(placement group \[\{'GPU'"):
        await ray_pool.start_ray_workers(cfg, ("large",), ready_timeout_s=3)
    (w,) = launched
    assert ray.util.placement_group_table(w.placement_group)["state"] == "REMOVED"
    _assert_dead(w)


# ---------------------------------------------------------------- a job on a `ray start` cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_command(out_dir: Path) -> list[str]:
    """What the submitted job runs: the issue's check, SpecReason on 10 arith problems, workers on the cluster."""
    reasonspec = shutil.which("reasonspec", path=str(Path(sys.executable).parent)) or "reasonspec"
    return [
        reasonspec, "eval", "--config", "arith-v1/specreason", "--set", "ray.address=auto",
        "--dataset", "arith", "--limit", "10", "--out", str(out_dir),
    ]


@pytest.fixture
def ray_head(small_model: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A `ray start --head` cluster with the job server; yields (dashboard url, env for `ray` commands).

    Stopped by terminating its ``--block`` process, which stops exactly the processes it
    started (``ray stop`` would stop every Ray instance on the machine).
    """
    pytest.importorskip("aiohttp_cors", reason="the job server (dashboard) needs ray[default]")
    # Ray 2.60 enables token auth on new clusters; the job CLI sends the token only in token mode.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    dash = _free_port()
    cmd = [
        shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start", "--head", "--block",
        f"--port={_free_port()}", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}", "--disable-usage-stats",
    ]
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if head.poll() is not None:
                log_tail = (tmp_path / "head.log").read_text()[-2000:]
                pytest.skip(f"`ray start --head` with the dashboard failed: {log_tail}")
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.skip("the Ray dashboard (job server) did not come up within 120s")
                time.sleep(1)
        yield url, env
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()


@pytest.mark.ray
def test_job_submitted_with_working_dir_runs_on_the_cluster(ray_head: tuple[str, dict[str, str]],
                                                            tmp_path: Path) -> None:
    url, env = ray_head
    out = tmp_path / "out"
    out.mkdir()
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", url, "--working-dir", ".", "--", *job_command(out)],
        cwd=PACKAGE_ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["tokens_small"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 10 and summary["policy"] == "specreason" and summary["accuracy"] >= 0.5


SEED_POLICIES = ["bild", "easd", "spec-verification", "reflective", "multi-candidate", "hierarchical", "pyramid"]


@pytest.mark.ray
async def test_seed_policies_on_ray_actors_write_what_they_write_in_process(ray_cluster: None) -> None:
    """The seeds' policies over real Ray actors (the arith world's three models) decide as over in-process
    workers: same text, same trace of who wrote what and what was rejected (greedy, a short budget)."""
    from tests.conftest import solve_all

    roles = ("small", "mid", "large")
    config = load_config("arith/hierarchical", {"ray.address": "local"})
    remote = await ray_pool.start_ray_workers(config, roles)
    local = {r: create_local_worker(config.models[r]) for r in roles}
    overrides = ["sampling.max_tokens=96"]
    try:
        for name in SEED_POLICIES:
            want = await solve_all(local, f"arith/{name}", PROBLEMS[:1], overrides)
            got = await solve_all(remote, f"arith/{name}", PROBLEMS[:1], overrides)
            assert got[0].text == want[0].text, name
            assert ([(s.author, s.kind, s.accepted) for s in got[0].segments]
                    == [(s.author, s.kind, s.accepted) for s in want[0].segments]), name
            assert len({s.author for s in want[0].segments}) >= 2, name  # both (all) models took part
    finally:
        for w in (*remote.values(), *local.values()):
            await w.close()
