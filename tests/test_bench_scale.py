"""The scale benchmark runs policies over a chain with the real 131k-vocabulary tokenizer (small sizes here)."""

from __future__ import annotations

import json

from evals.bench_scale import main


def test_scale_benchmark_reports_every_policy(tmp_path, capsys):
    out = tmp_path / "rows.json"
    policies = ["specreason", "speculative"]  # a step-level and a token-level policy (tokenizer loads dominate)
    main(["--steps", "12", "--step-tokens", "30", "--concurrency", "1", "2", "--per-call-ms", "0.1",
          "--policies", *policies, "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["concurrency"]) for r in rows] == [(p, c) for c in (1, 2) for p in policies]
    for r in rows:
        assert r["tokens"] > 300 and r["steps"] >= 12 and r["kib_per_step"] > 0 and r["overhead"] is not None
        assert (r["cpu_ms_first20"] is None) == (r["concurrency"] > 1)
    assert "orchestrator CPU per step" in capsys.readouterr().out
