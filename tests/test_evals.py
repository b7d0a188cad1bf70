"""The evaluation layer: datasets, the eval runner on a real arith model, resume, reports and bench."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import evals.datasets as datasets_module
from evals.arith.problems import ArithGenerator, split_of
from evals.datasets import DatasetError, load_dataset
from evals.report import build_report
from evals.runner import ERRORS, RESULTS, EvalError, load_records, run_bench, run_eval
from orchestrator.core import Orchestrator
from orchestrator.prompting import INSTRUCTION

SUMMARY_FIELDS = {
    "config", "policy", "dataset", "n", "samples", "accuracy", "mean_latency_s", "total_wall_s",
    "throughput_problems_per_s", "tokens_small", "tokens_large", "accepted_tokens_small", "accepted_tokens_large",
    "large_token_share", "prompt_tokens", "cached_prompt_tokens", "acceptance_rate", "handoffs",
    "spec_proposed_tokens", "spec_accepted_tokens", "errors",
}
RECORD_FIELDS = {"id", "sample", "problem", "answer", "gold", "correct", "latency_s", "tokens_small", "tokens_large",
                 "segments", "finish_reason", "accepted_tokens_small", "accepted_tokens_large"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- datasets


def test_math500_local_file():
    problems = load_dataset("math500")
    assert len(problems) == 500
    assert problems[0].id == "test/precalculus/807.json"
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"subject", "level", "solution"} <= set(problems[0].meta)
    assert len({p.id for p in problems}) == 500


def test_aime_local_files():
    aime24 = load_dataset("aime24")
    assert len(aime24) == 30 and aime24[0].id == "60" and aime24[0].answer == "204"
    aime25 = load_dataset("aime25", limit=5)
    assert [p.id for p in aime25] == ["1", "2", "3", "4", "5"]  # no ids in the file: line numbers
    assert aime25[0].answer == "70"  # an int in the file
    assert not aime25[0].problem.endswith(INSTRUCTION)  # the orchestrator adds its own


def test_data_folder_from_the_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "aime24.jsonl", [{"id": 7, "problem": "p", "answer": "016"}])
    monkeypatch.setenv("REASONSPEC_DATA", str(tmp_path))
    [p] = load_dataset("aime24")
    assert (p.id, p.answer) == ("7", "016")


def test_missing_dataset_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONSPEC_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(datasets_module, "PACKAGE_ROOT", tmp_path / "repo")
    with pytest.raises(DatasetError) as e:
        load_dataset("math500")
    msg = str(e.value)
    assert str(tmp_path / "data" / "math500.jsonl") in msg
    assert str(tmp_path / "shared" / "data" / "math500.jsonl") in msg
    assert "HuggingFaceH4/MATH-500" in msg


def test_jsonl_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "1+1", "ans": 2, "uid": 10},
                                              {"question": "2+2", "ans": 4, "uid": "b"}])
    problems = load_dataset("mine", path=path, fields={"problem": "question", "answer": "ans", "id": "uid"})
    assert [(p.id, p.problem, p.answer) for p in problems] == [("10", "1+1", "2"), ("b", "2+2", "4")]
    assert problems[0].meta == {"dataset": "mine"}


def test_jsonl_default_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "a", "solution": "so \\boxed{\\frac{1}{2}}.", "idx": 10},
        "",
        {"question": "b", "answer": "7", "extra": 1},
    ])
    problems = load_dataset("mine", path=path)
    assert [(p.id, p.problem, p.answer) for p in problems] == [("10", "a", "\\frac{1}{2}"), ("3", "b", "7")]
    assert problems[1].meta == {"dataset": "mine", "extra": 1}


@pytest.mark.parametrize("bad, message", [
    ('{"problem": "x", "answer": ', "line 3: invalid JSON"),
    ('[1, 2]', "line 3: expected a JSON object"),
    ('{"problem": "x"}', "line 3: no answer field"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}, bad])
    with pytest.raises(DatasetError) as e:
        load_dataset("bad", path=path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_mapped_field_missing_and_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "answer": "1", "id": 1}, {"answer": "2", "id": 2}])
    with pytest.raises(DatasetError, match="line 2: field 'q'"):
        load_dataset("x", path=path, fields={"problem": "q"})
    path = write_jsonl(tmp_path / "y.jsonl", [{"problem": "a", "answer": "1", "id": 1},
                                              {"problem": "b", "answer": "2", "id": 1}])
    with pytest.raises(DatasetError, match="line 2: id '1' already used on line 1"):
        load_dataset("y", path=path)


def test_arith_ids_stable_and_disjoint_from_training():
    problems = load_dataset("arith")
    assert len(problems) == 200  # the default limit
    assert [p.id for p in load_dataset("arith", limit=20)] == [p.id for p in problems[:20]]
    assert len({p.id for p in problems}) == 200
    assert all(split_of(p.problem) == "test" for p in problems)
    train = {p.text for p in ArithGenerator("train", "medium", 0).take(2000)}
    assert not train & {p.problem for p in problems}
    assert int(problems[0].answer) == eval(problems[0].problem)  # left to right, + and - only


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset 'gsm8k'"):
        load_dataset("gsm8k")
    with pytest.raises(DatasetError, match="not 'train'"):
        load_dataset("math500", split="train")
    with pytest.raises(DatasetError, match="splits train, val and test"):
        load_dataset("arith", split="dev")


# ---------------------------------------------------------------- the runner on the real arith small model


@pytest.fixture
def count_solves(arith_small: Orchestrator, monkeypatch) -> list[tuple[str, int]]:
    """Records (id, seed) of every solve the runner asks for."""
    calls: list[tuple[str, int]] = []
    solve = arith_small.asolve

    async def counted(problem, id=None, seed=None, **kw):
        calls.append((id, seed))
        return await solve(problem, id=id, seed=seed, **kw)

    monkeypatch.setattr(arith_small, "asolve", counted)
    return calls


async def test_run_eval_writes_results_and_summary(arith_small, tmp_path, count_solves):
    problems = load_dataset("arith", limit=3)
    summary = await run_eval(arith_small, problems, tmp_path, concurrency=3, samples=2, progress=False,
                             grade_timeout=60)  # a loaded machine must not turn into wrong grades

    records = read_lines(tmp_path / RESULTS)
    assert len(records) == 6 and sorted(count_solves) == sorted((p.id, s) for p in problems for s in (0, 1))
    assert sorted((r["id"], r["sample"]) for r in records) == sorted(count_solves)
    gold = {p.id: p.answer for p in problems}
    for r in records:
        assert RECORD_FIELDS <= set(r)
        assert r["gold"] == gold[r["id"]] and r["correct"] == (r["answer"] == r["gold"])
        assert r["segments"] and {"author", "text", "tokens", "kind", "accepted", "score"} <= set(r["segments"][0])
        assert r["tokens_small"] > 0 and r["tokens_large"] == 0

    assert SUMMARY_FIELDS <= set(summary)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert (summary["config"], summary["policy"], summary["dataset"]) == ("arith-v1-small-only", "small-only", "arith")
    assert (summary["n"], summary["samples"], summary["errors"]) == (3, 2, 0)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6)
    assert summary["tokens_small"] == sum(r["tokens_small"] for r in records)
    assert summary["large_token_share"] == 0 and summary["acceptance_rate"] is None
    assert summary["total_wall_s"] > 0 and summary["throughput_problems_per_s"] > 0
    assert "| accuracy |" in (tmp_path / "summary.md").read_text()

    with pytest.raises(EvalError, match="resume"):  # a finished folder is not overwritten by accident
        await run_eval(arith_small, problems, tmp_path, concurrency=1, progress=False)


async def test_interrupt_then_resume_after_a_crash(arith_small, tmp_path, count_solves, monkeypatch):
    problems = load_dataset("arith", limit=5)
    results = tmp_path / RESULTS
    solve, started, never = arith_small.asolve, [], asyncio.Event()

    async def three_then_stuck(problem, **kw):  # the run is still going when 3 are in, however fast they were
        started.append(problem)
        if len(started) > 3:
            await never.wait()
        return await solve(problem, **kw)

    # Ctrl-C once a few results are in: what finished is on disk, line by line
    monkeypatch.setattr(arith_small, "asolve", three_then_stuck)
    task = asyncio.create_task(run_eval(arith_small, problems, tmp_path, concurrency=2, progress=False))
    while not task.done() and (not results.exists() or len(results.read_text().splitlines()) < 3):
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(arith_small, "asolve", solve)
    lines = results.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    partial = json.loads((tmp_path / "summary.json").read_text())  # what finished is summarized before stopping
    assert partial["completed"] == len(lines) and partial["complete"] is False

    # then a crash: a finished line lost, and the last one cut halfway through
    damaged = [lines[0], *lines[2:-1], lines[-1][: len(lines[-1]) // 2]]
    results.write_text("\n".join(damaged))
    kept = [json.loads(line) for line in damaged[:-1]]
    count_solves.clear()

    summary = await run_eval(arith_small, problems, tmp_path, concurrency=2, resume=True, progress=False)
    records = read_lines(results)
    assert sorted(r["id"] for r in records) == sorted(p.id for p in problems)  # each exactly once
    assert sorted(i for i, _ in count_solves) == sorted({p.id for p in problems} - {r["id"] for r in kept})
    by_id = {r["id"]: r for r in records}
    assert all(by_id[r["id"]] == r for r in kept)  # finished lines untouched, not redone
    assert summary["n"] == 5 and summary["runs"] == 2

    count_solves.clear()  # nothing left to do
    again = await run_eval(arith_small, problems, tmp_path, concurrency=2, resume=True, progress=False)
    assert count_solves == [] and read_lines(results) == records and again["accuracy"] == summary["accuracy"]


async def test_a_failing_solve_goes_to_errors_and_is_redone_on_resume(arith_small, tmp_path, monkeypatch):
    problems = load_dataset("arith", limit=3)
    solve = arith_small.asolve

    async def flaky(problem, id=None, seed=None, **kw):
        if id == problems[1].id:
            raise RuntimeError("worker died")
        return await solve(problem, id=id, seed=seed, **kw)

    monkeypatch.setattr(arith_small, "asolve", flaky)
    summary = await run_eval(arith_small, problems, tmp_path, concurrency=3, progress=False)
    assert summary["errors"] == 1 and summary["n"] == 2
    assert {r["id"] for r in read_lines(tmp_path / RESULTS)} == {problems[0].id, problems[2].id}
    [error] = read_lines(tmp_path / ERRORS)
    assert error["id"] == problems[1].id and "worker died" in error["error"]

    monkeypatch.setattr(arith_small, "asolve", solve)
    summary = await run_eval(arith_small, problems, tmp_path, concurrency=3, resume=True, progress=False)
    assert summary["errors"] == 0 and summary["n"] == 3


def test_load_records_repairs_only_a_crashed_tail(tmp_path):
    path = tmp_path / RESULTS
    path.write_text('{"id": "a", "sample": 0}\n{"id": "a", "sample": 0}\n{"id": "b", "sample": 0}\n{"id": "c", "sa')
    assert [r["id"] for r in load_records(path)] == ["a", "b"]
    assert path.read_text() == '{"id": "a", "sample": 0}\n{"id": "b", "sample": 0}\n'
    path.write_text('{"id": "a", "sample": 0}\n{"id": "b", \n{"id": "c", "sample": 0}\n')
    with pytest.raises(EvalError, match="line 2"):
        load_records(path)


async def test_math500_pipeline_end_to_end(tmp_path):
    """MATH500 through the arith model: its answers are wrong, the pipeline and outputs are what is tested."""
    orch = Orchestrator.from_config("arith-v1/small-only", ["sampling.max_tokens=24"])
    problems = load_dataset("math500", limit=3)
    try:
        summary = await run_eval(orch, problems, tmp_path, concurrency=3, progress=False)
    finally:
        await orch.aclose()
    records = read_lines(tmp_path / RESULTS)
    assert [r["id"] for r in sorted(records, key=lambda r: r["id"])] == sorted(p.id for p in problems)
    assert all(r["correct"] is False and r["tokens_small"] <= 24 for r in records)
    assert (summary["dataset"], summary["n"], summary["accuracy"]) == ("math500", 3, 0.0)


# ---------------------------------------------------------------- reports and bench


def fake_run(folder: Path, config: str, policy: str, accuracy: float, latency: float, wall: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "config": config, "policy": policy, "dataset": "arith", "n": 10, "samples": 1, "accuracy": accuracy,
        "mean_latency_s": latency, "total_wall_s": wall, "large_token_share": 0.5, "acceptance_rate": 0.8,
    }))
    return folder


def test_report_table_and_plot(tmp_path):
    dirs = [fake_run(tmp_path / "large", "large-only", "large-only", 0.9, 4.0, 40.0),
            fake_run(tmp_path / "t3", "specreason-t3", "specreason", 0.7, 1.0, 10.0),
            fake_run(tmp_path / "t7", "specreason-t7", "specreason", 0.85, 2.0, 20.0)]
    rows = build_report(dirs, tmp_path / "out" / "report.md")
    assert [r["speedup"] for r in rows] == [1.0, 4.0, 2.0]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| specreason-t7 | specreason |" in md
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no summary.json"):
        build_report([tmp_path / "out"], None)


async def test_bench_runs_each_config_in_turn(tmp_path):
    rows = await run_bench(["arith-v1/small-only", "arith-v1/small-only"], "arith", 3, 3, tmp_path, progress=False)
    assert [r["config"] for r in rows] == ["arith-v1-small-only"] * 2
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # greedy: the same answers
    for key in ("policy", "accuracy", "total_wall_s", "mean_latency_s", "large_token_share", "acceptance_rate"):
        assert key in rows[0]
    assert json.loads((tmp_path / "bench.json").read_text()) == rows
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.png").exists()
    assert len(read_lines(tmp_path / "arith-v1-small-only" / RESULTS)) == 3
    assert len(read_lines(tmp_path / "arith-v1-small-only-2" / RESULTS)) == 3


async def test_bench_rounds_interleave_the_configs(tmp_path, monkeypatch):
    """--rounds 2: every config runs the first half, then every config the second (resumed sessions)."""
    import evals.runner as runner

    calls, real = [], runner.eval_config

    async def recording(config, problems, out_dir, **kw):
        calls.append((out_dir.name, len(problems)))
        return await real(config, problems, out_dir, **kw)

    monkeypatch.setattr(runner, "eval_config", recording)
    rows = await run_bench(["arith-v1/small-only", "arith-v1/large-only"], "arith", 4, 2, tmp_path, progress=False,
                           rounds=2)
    assert calls == [("arith-v1-small-only", 2), ("arith-v1-large-only", 2),
                     ("arith-v1-small-only", 4), ("arith-v1-large-only", 4)]
    for name in ("arith-v1-small-only", "arith-v1-large-only"):
        records = read_lines(tmp_path / name / RESULTS)
        assert sorted(r["run"] for r in records) == [1, 1, 2, 2]  # each problem once, in two sessions
    assert [r["n"] for r in rows] == [4, 4] and rows[0]["speedup"] == 1.0
