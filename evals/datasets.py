"""Eval datasets as lists of ``Problem`` with stable string ids.

Named datasets: ``arith`` (generated: the held-out test split), ``math500``, ``aime24`` and
``aime25``. The math sets come from local JSONL files (``$REASONSPEC_DATA`` or
``../shared/data/`` next to the repository), or from the hub through the optional
``datasets`` package when no file is found. Any other JSONL file loads through ``path`` with
a field mapping. Results are keyed by problem id, so ids are kept exactly as the source
gives them (as strings) and fall back to the line number only when a file has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from evals.arith.problems import ArithGenerator
from orchestrator.answer import last_boxed
from orchestrator.config import PACKAGE_ROOT
from orchestrator.prompting import INSTRUCTION


class Problem(BaseModel):
    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = Field(default_factory=dict)


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message says where and what was tried."""


#: Field names tried in order when a JSONL file has no explicit mapping.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "problem": ("problem", "question", "prompt"),
    "answer": ("answer",),
    "id": ("id", "unique_id", "idx"),
}
#: Where a gold answer is taken from (its last ``\\boxed{}``) when there is no answer field.
SOLUTION_FIELD = "solution"

ARITH_DEFAULT_LIMIT = 200


@dataclass(frozen=True)
class _Source:
    file: str
    hub_id: str
    hub_split: str


SOURCES: dict[str, _Source] = {
    "math500": _Source("math500.jsonl", "HuggingFaceH4/MATH-500", "test"),
    "aime24": _Source("aime24.jsonl", "HuggingFaceH4/aime_2024", "train"),
    "aime25": _Source("aime25.jsonl", "yentinglin/aime_2025", "train"),
}
DATASETS = ("arith", *SOURCES)


def load_dataset(
    name: str,
    path: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[Problem]:
    """The first ``limit`` problems of a dataset.

    ``name`` is one of ``DATASETS`` or, with ``path``, a label for a JSONL file.
    ``split``: the arith split (``test`` by default; ``val``, ``train``) or a hub split;
    a local file has no splits. ``fields`` maps ``problem``/``answer``/``id`` to a
    file's field names (see ``DEFAULT_FIELDS``).
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    if name == "arith" and path is None:
        return _arith(split or "test", limit or ARITH_DEFAULT_LIMIT)
    if path is not None:
        if split is not None:
            raise DatasetError(f"{path}: a JSONL file has no splits (got split={split!r})")
        return _read_jsonl(Path(path), name, limit, fields)
    source = SOURCES.get(name)
    if source is None:
        raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, or give a JSONL path")
    tried = []
    for folder in _data_dirs():
        candidate = folder / source.file
        if candidate.is_file():
            if split not in (None, source.hub_split):
                raise DatasetError(f"{name}: {candidate} is the {source.hub_split!r} split, not {split!r}")
            return _read_jsonl(candidate, name, limit, fields)
        tried.append(str(candidate))
    try:
        return _from_hub(name, source, split or source.hub_split, limit, fields)
    except DatasetError:  # the hub answered with rows this loader cannot read
        raise
    except Exception as e:  # not installed, offline, unknown split: say everything that was tried
        raise DatasetError(
            f"dataset {name!r} not found: no local file ({', '.join(tried)}; set $REASONSPEC_DATA to a folder "
            f"holding {source.file}, or pass a path) and the hub ({source.hub_id}) failed: {e}"
        ) from e


def _data_dirs() -> list[Path]:
    """Folders searched for the named datasets' files, in order."""
    env = os.environ.get("REASONSPEC_DATA")
    return ([Path(env)] if env else []) + [PACKAGE_ROOT.parent / "shared" / "data"]


def _arith(split: str, limit: int) -> list[Problem]:
    if split not in ("train", "val", "test"):
        raise DatasetError(f"arith has splits train, val and test, not {split!r}")
    generator = ArithGenerator(split=split, difficulty="medium", seed=0)  # type: ignore[arg-type]
    return [
        Problem(id=p.id, problem=p.text, answer=str(p.answer),
                meta={"dataset": "arith", "split": split, "difficulty": "medium"})
        for p in generator.take(limit)
    ]


def _from_hub(name: str, source: _Source, split: str, limit: int | None,
              fields: Mapping[str, str] | None) -> list[Problem]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError("the `datasets` package is not installed (pip install reasonspec[datasets])") from None
    rows = datasets.load_dataset(source.hub_id, split=split)
    where = f"{source.hub_id}[{split}]"
    return _problems(((i, dict(row)) for i, row in enumerate(rows, 1)), where, name, limit, fields)


def _read_jsonl(path: Path, name: str, limit: int | None, fields: Mapping[str, str] | None) -> list[Problem]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}, line {line}: not UTF-8 (byte {data[e.start]:#04x}); save it as UTF-8") from None

    def rows() -> Iterable[tuple[int, dict[str, Any]]]:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {lineno}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row

    return _problems(rows(), str(path), name, limit, fields)


def _problems(rows: Iterable[tuple[int, dict[str, Any]]], where: str, name: str, limit: int | None,
              fields: Mapping[str, str] | None) -> list[Problem]:
    unknown = set(fields or {}) - set(DEFAULT_FIELDS)
    if unknown:
        raise DatasetError(f"unknown field mapping key(s) {sorted(unknown)}; use {', '.join(DEFAULT_FIELDS)}")
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        try:
            problem = _to_problem(row, lineno, fields or {}, name)
        except KeyError as e:
            raise DatasetError(f"{where}, line {lineno}: {e.args[0]}") from None
        if problem.id in seen:
            raise DatasetError(f"{where}, line {lineno}: id {problem.id!r} already used on line {seen[problem.id]}")
        seen[problem.id] = lineno
        out.append(problem)
        if limit is not None and len(out) >= limit:
            break
    if not out:  # an eval of nothing would report "0 problems" and succeed
        raise DatasetError(f"{where}: no problems in it (empty, or blank lines only)")
    return out


def _to_problem(row: dict[str, Any], lineno: int, fields: Mapping[str, str], name: str) -> Problem:
    """One row as a Problem; a missing field raises KeyError with the reason."""

    def pick(key: str) -> tuple[str, Any] | None:
        if key in fields:
            if row.get(fields[key]) is None:
                raise KeyError(f"field {fields[key]!r} (mapped from {key!r}) is missing")
            return fields[key], row[fields[key]]
        return next(((f, row[f]) for f in DEFAULT_FIELDS[key] if row.get(f) is not None), None)

    problem = pick("problem")
    if problem is None:
        raise KeyError(f"no problem field (tried {', '.join(DEFAULT_FIELDS['problem'])}; map one with fields)")
    answer = pick("answer")
    if answer is None and isinstance(row.get(SOLUTION_FIELD), str):
        boxed = last_boxed(row[SOLUTION_FIELD])
        answer = (SOLUTION_FIELD, boxed) if boxed is not None else None
    if answer is None:
        raise KeyError(f"no answer field (tried {', '.join(DEFAULT_FIELDS['answer'])} and a boxed "
                       f"{SOLUTION_FIELD}; map one with fields)")
    ident = pick("id")
    used = {problem[0], answer[0]} | ({ident[0]} if ident else set())
    return Problem(
        id=str(ident[1]) if ident else str(lineno),
        problem=_strip_instruction(str(problem[1])),
        answer=str(answer[1]).strip(),
        meta={"dataset": name, **{k: v for k, v in row.items() if k not in used}},
    )


def _strip_instruction(problem: str) -> str:
    """Drop a trailing copy of the boxed-answer instruction (the aime25 file has one).

    The orchestrator appends its own instruction to every problem; a problem that already
    ends with it would be prompted with it twice.
    """
    problem = problem.strip()
    return problem[: -len(INSTRUCTION)].rstrip() if problem.endswith(INSTRUCTION) else problem
