"""Saved serving-benchmark results (`benchmark_serving --save-result`, vLLM's field names) read into
runs, and runs grouped by config and by sitting.

A config is what was measured: model, engine, ISL/OSL, GPUs and the `--metadata` strings that do
not say when or from which commit (`kv_cache_dtype=fp8`, `gpu=H200`). A sitting is one sweep over
concurrency: the runs of one commit, else of one folder, else of one day.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

DATE_FORMAT = "%Y%m%d-%H%M%S"
REQUIRED_NUMBERS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")
# String fields the benchmark itself writes: anything else that is a string is `--metadata`.
KNOWN_STRING_FIELDS = frozenset(
    {
        "date",
        "backend",
        "endpoint_type",
        "endpoint",
        "label",
        "model_id",
        "model_name",
        "served_model_name",
        "tokenizer_id",
        "tokenizer_mode",
        "dataset_name",
        "dataset_path",
        "request_rate",
        "percentile_metrics",
        "metric_percentiles",
        "goodput",
    }
)
# Metadata that says when or from what a run was made, not what was measured.
WHEN_KEYS = frozenset(
    {"commit", "git_commit", "git_sha", "sha", "datetime", "timestamp", "time", "tag", "note"}
    | {"notes", "host", "hostname", "run_id", "sitting"}
)
WHEN_KEY_PATTERN = re.compile(r".*_(commit|date|time|timestamp|sha)$")
COMMIT_KEYS = ("commit", "git_commit", "git_sha", "sha")
CONFIG_KEYS = frozenset({"engine", "num_gpus"})
PYTORCH_SUFFIX = ".pytorch.json"  # the PyTorch-benchmark companion of each vLLM result


class NotAResultError(ValueError):
    """A JSON file that is not a serving-benchmark result."""


@dataclass(frozen=True, slots=True, order=True)
class Config:
    model: str  # basename of model_id
    engine: str  # `engine` metadata, else the client backend
    isl: int
    osl: int
    num_gpus: int
    extra: tuple[tuple[str, str], ...] = ()  # sorted (key, value) metadata

    def label(self, with_model: bool = True) -> str:
        parts = [self.model] if with_model else []
        parts += [self.engine, f"ISL/OSL {self.isl}/{self.osl}", f"{self.num_gpus} GPU"]
        parts += [f"{key}={value}" for key, value in self.extra]
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        fields = {"model": self.model, "engine": self.engine, "isl": self.isl, "osl": self.osl}
        return fields | {"num_gpus": self.num_gpus, **dict(self.extra)}


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """One result file."""

    path: str  # relative to the results folder, with forward slashes
    date: datetime
    config: Config
    max_concurrency: int | None  # None: rate-limited, no concurrency cap
    commit: str | None
    sitting: str
    metrics: Mapping[str, float]  # every numeric field of the file

    @property
    def output_throughput(self) -> float:
        return self.metrics["output_throughput"]

    @property
    def tok_s_gpu(self) -> float:
        return self.output_throughput / self.config.num_gpus

    @property
    def tok_s_user(self) -> float | None:
        tpot = self.metrics["mean_tpot_ms"]
        return 1000.0 / tpot if tpot > 0 else None

    @property
    def concurrency_label(self) -> str:
        return "∞" if self.max_concurrency is None else str(self.max_concurrency)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _parse_date(value: Any) -> datetime:
    if not isinstance(value, str):
        raise NotAResultError("no `date` string")
    try:
        return datetime.strptime(value, DATE_FORMAT)
    except ValueError:
        try:
            return datetime.fromisoformat(value).replace(tzinfo=None)
        except ValueError:
            raise NotAResultError(f"date {value!r} is neither {DATE_FORMAT} nor ISO") from None


def _length(data: Mapping[str, Any], nominal: str, total: str) -> int:
    """The nominal random-dataset length, else the mean over completed requests."""
    value = _number(data.get(nominal))
    if value is not None:
        return round(value)
    completed, tokens = _number(data.get("completed")), _number(data.get(total))
    if not completed or tokens is None:
        raise NotAResultError(f"no {nominal}, and no completed requests to derive it from")
    return round(tokens / completed)


def _num_gpus(data: Mapping[str, Any]) -> int:
    value = data.get("num_gpus", 1)
    try:
        num_gpus = int(value)
    except (TypeError, ValueError):
        raise NotAResultError(f"num_gpus {value!r} is not an integer") from None
    if num_gpus < 1:
        raise NotAResultError(f"num_gpus {value!r} is not positive")
    return num_gpus


def _extra(data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """`--metadata` strings that describe the config, and a finite request rate."""
    extra = {
        key: value
        for key, value in data.items()
        if isinstance(value, str)
        and key not in KNOWN_STRING_FIELDS | CONFIG_KEYS | WHEN_KEYS
        and not WHEN_KEY_PATTERN.match(key)
    }
    rate = _number(data.get("request_rate"))
    if rate is not None:  # "inf" is a string: an unlimited rate is the default, left out
        extra["request_rate"] = f"{rate:g}"
    return tuple(sorted(extra.items()))


def parse_result(data: Any, path: str, folder: str) -> Run:
    """A Run from one decoded file; `folder` is its folder relative to the results root."""
    if not isinstance(data, dict):
        raise NotAResultError("not a JSON object")
    model_id = data.get("model_id")
    if not isinstance(model_id, str) or not model_id.strip("/"):
        raise NotAResultError("no `model_id`")
    missing = [key for key in REQUIRED_NUMBERS if _number(data.get(key)) is None]
    if missing:
        raise NotAResultError(f"no number for {', '.join(missing)}")
    config = Config(
        model=PurePosixPath(model_id.replace("\\", "/").rstrip("/")).name,
        engine=str(data.get("engine") or data.get("backend") or "unknown"),
        isl=_length(data, "random_input_len", "total_input_tokens"),
        osl=_length(data, "random_output_len", "total_output_tokens"),
        num_gpus=_num_gpus(data),
        extra=_extra(data),
    )
    date = _parse_date(data.get("date"))
    commit = next((str(data[k]) for k in COMMIT_KEYS if data.get(k) not in (None, "")), None)
    concurrency = _number(data.get("max_concurrency"))
    metrics = {key: n for key, value in data.items() if (n := _number(value)) is not None}
    return Run(
        path=path,
        date=date,
        config=config,
        max_concurrency=None if concurrency is None else int(concurrency),
        commit=commit,
        sitting=f"commit {commit}" if commit else folder or date.strftime("%Y-%m-%d"),
        metrics=metrics,
    )


def load_results(root: Path) -> tuple[list[Run], list[str]]:
    """Every result under `root` (recursively), oldest first, and the files skipped."""
    runs: list[Run] = []
    skipped: list[str] = []
    for file in sorted(root.rglob("*.json")):
        rel = file.relative_to(root).as_posix()
        if file.name.endswith(PYTORCH_SUFFIX):
            logger.debug("skipping the PyTorch-format companion %s", rel)
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            runs.append(parse_result(data, rel, file.parent.relative_to(root).as_posix()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, NotAResultError) as exc:
            logger.warning("skipping %s: not a serving-benchmark result (%s)", rel, exc)
            skipped.append(rel)
    runs.sort(key=lambda run: (run.date, run.path))
    return runs, skipped


def group_by(runs: Iterable[Run], key: Any) -> dict[Any, list[Run]]:
    """Runs per key(run), keys sorted, each list in the input's (date) order."""
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return {k: groups[k] for k in sorted(groups, key=_sort_key)}


def _sort_key(key: Any) -> Any:
    # None (no concurrency cap) sorts after every number; tuples compare element by element.
    if isinstance(key, tuple):
        return tuple(_sort_key(part) for part in key)
    return (key is None, key if key is not None else 0)


def latest_per_concurrency(runs: Iterable[Run]) -> list[Run]:
    """The newest run of each (config, max_concurrency)."""
    groups = group_by(runs, lambda run: (run.config, run.max_concurrency))
    return [group[-1] for group in groups.values()]
