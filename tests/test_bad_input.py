"""Bad input and faults in evals and the CLI (issue 13): one-line errors with exit code 2, resumes that would
mix runs, workers out of restarts, empty datasets, Ctrl-C, and strict sampling settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import orchestrator.core
from evals.datasets import DatasetError, load_dataset
from evals.runner import ERRORS, RESULTS, RUN_CONFIG, RunChangedError, run_eval
from orchestrator.cli import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_USAGE, app
from orchestrator.config import PACKAGE_ROOT, ConfigError, load_config
from orchestrator.core import Orchestrator
from orchestrator.pool import create_local_worker
from workers.protocol import GenParams, WorkerError

REASONSPEC = str(Path(sys.executable).parent / "reasonspec")


def cli(*args: str) -> tuple[int, str]:
    """``reasonspec ARGS`` in this process: exit code and everything it printed."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *expected: str) -> None:
    assert code == EXIT_USAGE, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    for text in expected:
        assert text in output


def eval_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", "--config", "arith-v1/small-only", "--limit", "1", "--out", str(tmp_path / "out"), *extra]


# ---------------------------------------------------------------- configs and model paths


def test_config_file_errors_are_one_line(tmp_path):
    assert_one_line_error(*cli("eval", "--config", str(tmp_path)), str(tmp_path), "is a directory")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    assert_one_line_error(*cli("eval", "--config", str(latin1)), str(latin1), "not UTF-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodels: [a\npolicy: {type: small-only}\n")
    assert_one_line_error(*cli("eval", "--config", str(broken)), str(broken), "invalid YAML", "line 3")


def test_override_that_is_not_yaml_names_the_override(tmp_path):
    assert_one_line_error(*cli(*eval_args(tmp_path, "--set", "policy.threshold=[")),
                          "override 'policy.threshold=['", "not valid YAML")


def test_folder_that_is_not_a_model_is_named(tmp_path):
    assert_one_line_error(*cli(*eval_args(tmp_path, "--set", "models.small.path=/etc")),
                          "models.small.path: /etc is not a model folder", "config.json", "tokenizer")


def test_missing_model_names_each_folder_once(monkeypatch):
    monkeypatch.chdir(PACKAGE_ROOT)
    with pytest.raises(ConfigError, match="not found") as e:
        load_config("arith-v1/small-only", ["models.small.path=no/such/model/dir"])
    assert str(e.value).count(str(PACKAGE_ROOT)) == 2  # the config file's path, then the one folder looked in
    assert f"looked in {PACKAGE_ROOT})" in str(e.value)


@pytest.mark.timeout(120)
def test_hub_id_offline_is_refused_at_once(tmp_path):
    """A two-word path that is no folder, with the hub off: one line, no minute of hub retries."""
    start = time.perf_counter()
    proc = subprocess.run([REASONSPEC, *eval_args(tmp_path, "--set", "models.small.path=nonexistent/model")],
                          capture_output=True, text=True, timeout=100, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          cwd=PACKAGE_ROOT)
    assert_one_line_error(proc.returncode, proc.stdout + proc.stderr, "models.small.path: 'nonexistent/model'",
                          "neither a local folder", "HF_HUB_OFFLINE")
    assert time.perf_counter() - start < 60  # start-up alone on a busy machine; was 54 s of retries online


def test_hub_id_unreachable_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(self, repo_id, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    assert_one_line_error(*cli(*eval_args(tmp_path, "--set", "models.small.path=nonexistent/model")),
                          "'nonexistent/model' is neither a local folder", "nor reachable on the hub")


def test_run_command_model_errors_are_one_line(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(*cli("run", "--config", "arith-v1/small-only", "--set", "models.small.path=nonexistent/model",
                               "1 + 1"), "models.small.path: 'nonexistent/model' is neither a local folder")
    assert_one_line_error(*cli("run", "--config", "arith-v1/small-only", "--set", "models.small.path=/etc", "1 + 1"),
                          "/etc is not a model folder")


@pytest.mark.parametrize("override, key, message", [
    ("sampling.temperature=.inf", "sampling.temperature", "finite"),
    ("sampling.temperature=.nan", "sampling.temperature", "finite"),
    ("sampling.max_tokens=true", "sampling.max_tokens", "valid integer"),
    ("eval.limit=true", "eval.limit", "valid integer"),
    ("sampling.top_p=yes", "sampling.top_p", "valid number"),
])
def test_sampling_settings_are_typed_and_finite(override, key, message):
    with pytest.raises(ConfigError, match=rf"{key}: .*{message}"):
        load_config("arith-v1/small-only", [override])


@pytest.mark.parametrize("params", [{"max_tokens": True}, {"temperature": float("inf")}, {"top_p": float("nan")},
                                    {"top_k": 2.0}])
def test_gen_params_are_strict(params):
    with pytest.raises(ValueError):
        GenParams(**params)
    assert GenParams(temperature=1, max_tokens=8).temperature == 1.0  # an int temperature is a number


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("content, message", [
    (b"", "no problems"),
    (b"\n  \n\n", "no problems"),
    (b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "2"}\n', "line 2: not UTF-8"),
    (b'{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n', "line 2: invalid JSON"),
    (b'{"problem": "1+1"}\n', "line 1: no answer field"),
])
def test_dataset_errors_are_one_line(tmp_path, content, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset("mine", path=data)
    assert_one_line_error(*cli("eval", "--config", "arith-v1/small-only", "--dataset", "jsonl", "--dataset-path",
                               str(data), "--out", str(tmp_path / "out")), str(data), message)


def test_bench_dataset_error_is_one_line(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    assert_one_line_error(*cli("bench", "--configs", "arith-v1/small-only", "--dataset", "jsonl", "--dataset-path",
                               str(data), "--out", str(tmp_path / "bench")), str(data), "no problems")


# ---------------------------------------------------------------- resume must not mix runs


async def test_resume_refuses_another_config_or_dataset(arith_small, tmp_path):
    problems = load_dataset("arith", limit=2)
    await run_eval(arith_small, problems, tmp_path, concurrency=2, progress=False)
    recorded = json.loads((tmp_path / RUN_CONFIG).read_text())
    assert recorded["config"]["policy"]["type"] == "small-only" and recorded["dataset"] == "arith"

    another = Orchestrator(load_config("arith-v1/specreason"))  # refused before any model loads
    with pytest.raises(RunChangedError, match=r"policy\.type: small-only -> specreason.*--allow-config-change"):
        await run_eval(another, problems, tmp_path, concurrency=2, resume=True, progress=False)
    shorter = Orchestrator(load_config("arith-v1/small-only", ["sampling.max_tokens=300"]))
    with pytest.raises(RunChangedError, match=r"sampling\.max_tokens: 400 -> 300"):
        await run_eval(shorter, problems, tmp_path, concurrency=2, resume=True, progress=False)
    reworded = [p.model_copy(update={"problem": p.problem + " + 1"}) for p in problems]
    with pytest.raises(RunChangedError, match=r"problems: 2 finished problem\(s\) now read differently"):
        await run_eval(arith_small, reworded, tmp_path, concurrency=2, resume=True, progress=False)
    with pytest.raises(RunChangedError, match=r"dataset: arith -> other"):
        await run_eval(arith_small, problems, tmp_path, concurrency=2, resume=True, progress=False, dataset="other")
    assert len((tmp_path / RESULTS).read_text().splitlines()) == 2  # nothing was mixed in

    # a longer run of the same config extends it: legitimate
    summary = await run_eval(arith_small, load_dataset("arith", limit=3), tmp_path, concurrency=2, resume=True,
                             progress=False)
    assert summary["n"] == 3 and summary["complete"]
    # and a change can be allowed explicitly; the folder then records the new config
    changed = Orchestrator(load_config("arith-v1/small-only", ["sampling.max_tokens=300"]),
                           workers={"small": arith_small.models["small"].worker})
    summary = await run_eval(changed, load_dataset("arith", limit=4), tmp_path, concurrency=2, resume=True,
                             progress=False, allow_config_change=True)
    assert summary["n"] == 4
    assert json.loads((tmp_path / RUN_CONFIG).read_text())["config"]["sampling"]["max_tokens"] == 300


def test_cli_resume_with_another_config_exits_2(tmp_path):
    out = tmp_path / "out"
    code, output = cli("eval", "--config", "arith-v1/small-only", "--limit", "1", "--out", str(out))
    assert code == 0, output
    assert_one_line_error(*cli("eval", "--config", "arith-v1/specreason", "--limit", "2", "--out", str(out), "--resume"),
                          "policy.type: small-only -> specreason", "--allow-config-change")
    assert_one_line_error(*cli("eval", "--config", "arith-v1/small-only", "--set", "sampling.max_tokens=300", "--limit",
                               "2", "--out", str(out), "--resume"), "sampling.max_tokens: 400 -> 300")
    assert len((out / RESULTS).read_text().splitlines()) == 1
    code, output = cli("eval", "--config", "arith-v1/small-only", "--limit", "2", "--out", str(out), "--resume")
    assert code == 0, output  # --limit growing on resume extends the run
    assert len((out / RESULTS).read_text().splitlines()) == 2


# ---------------------------------------------------------------- a worker out of restarts


class OutOfRestarts:
    """A worker whose Ray actor spends its last restart after ``lives`` generate calls: every later call fails,
    as ``RayWorker`` fails them (``WorkerError``), stats included."""

    def __init__(self, inner, lives: int) -> None:
        self.inner, self.lives = inner, lives

    async def generate(self, prompt_ids, params):
        self.lives -= 1
        if self.lives < 0:
            raise WorkerError("small: its Ray actor died and placement.max_restarts is spent")
        return await self.inner.generate(prompt_ids, params)

    async def stats(self):
        if self.lives < 0:
            raise WorkerError("small: actor died during stats")
        return await self.inner.stats()

    def __getattr__(self, name):  # info, score, close: the real worker's
        return getattr(self.inner, name)


def test_eval_with_a_dead_worker_writes_the_summary_and_exits_3(tmp_path, monkeypatch):
    async def dying_workers(config, roles):
        return {"small": OutOfRestarts(create_local_worker(config.models["small"]), lives=2)}

    monkeypatch.setattr(orchestrator.core, "start_workers", dying_workers)
    out = tmp_path / "out"
    code, output = cli("eval", "--config", "arith-v1/small-only", "--limit", "4", "--concurrency", "1", "--out", str(out))
    assert code == EXIT_INCOMPLETE, output
    assert "Traceback" not in output and "2 of 4 solves finished, 2 failed" in output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["completed"], summary["errors"], summary["complete"]) == (2, 2, False)
    assert summary["spec_proposed_tokens"] is None  # the dead worker could not say
    errors = [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]
    assert len(errors) == 2 and all("max_restarts is spent" in e["error"] for e in errors)


# ---------------------------------------------------------------- Ctrl-C

#: Runs a command as a terminal's job: SIGINT at its default. A test runner started in the background of a
#: non-interactive shell (`cmd &`) inherits SIGINT ignored, and an ignored SIGINT stays ignored across exec, so
#: the eval would never see the Ctrl-C (it ran all 200 problems and exited 0 in such a CI run).
AS_A_TERMINAL_JOB = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                           "os.execv(sys.argv[1], sys.argv[1:])"]


@pytest.mark.timeout(300)
def test_ctrl_c_writes_the_partial_summary_and_exits_quietly(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*AS_A_TERMINAL_JOB, REASONSPEC, "eval", "--config", "arith/small-only", "--limit", "200",
                             "--concurrency", "2", "--out", str(out)],
                            cwd=PACKAGE_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, as a terminal's job
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / RESULTS).exists() and len((out / RESULTS).read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the eval ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, grading processes included
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    summary = json.loads((out / "summary.json").read_text())
    finished = len((out / RESULTS).read_text().splitlines())
    assert summary["completed"] == finished >= 2 and summary["complete"] is False and summary["problems"] == 200
