"""Deterministic de-duplication, train/dev/test splitting and stratified subsampling.

Every decision here is a function of an example's *content*, never of its position in a file:

* An example's key is the SHA-1 of its normalised text (NFKC, case-folded, whitespace collapsed; the
  second text of a pair is appended after a separator). Identical texts that differ only in case or
  spacing therefore count as duplicates, which keeps near-copies from leaking between splits.
* De-duplication keeps the first occurrence of a text and drops a text entirely when its copies carry
  different labels (we cannot know which label is right).
* The split of an example is read off its key: the first 60 bits of the SHA-1 as a number ``u`` in
  ``[0, 1)``; ``u < 0.8`` is train, ``u < 0.9`` dev, the rest test. Adding, removing or reordering rows
  never moves any other example to a different split, which a "sort then cut at 80%" rule would.
* Within a split, examples are ordered by key, so the order is also independent of the file.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "SPLIT_NAMES",
    "TextClassificationData",
    "deduplicate_examples",
    "example_key",
    "normalise_text",
    "split_examples",
    "stratified_subsample",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "test")

# 60 bits of the digest: plenty of resolution for the split fractions, and exact as a Python float.
_HASH_BITS = 60
_PAIR_SEPARATOR = "\x1e"  # ASCII record separator: cannot occur in normalised text, so keys are unambiguous.


def normalise_text(text: str) -> str:
    """Normalise text for duplicate detection: NFKC, case-fold, collapse whitespace.

    Args:
        text: Any string.

    Returns:
        The normalised string (only used for keys; examples keep their original text).
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_key(example: dict) -> str:
    """Content key of an example: hex SHA-1 of its normalised ``text`` (and ``text_pair`` if present).

    Args:
        example: A dict with a ``"text"`` string and optionally a ``"text_pair"`` string.

    Returns:
        A 40-character hex digest.
    """
    content = normalise_text(example["text"])
    if example.get("text_pair") is not None:
        content += _PAIR_SEPARATOR + normalise_text(example["text_pair"])
    return hashlib.sha1(content.encode("utf-8")).hexdigest()


def _unit_interval(hex_digest: str) -> float:
    """Map a hex digest to a number in [0, 1) using its first ``_HASH_BITS`` bits."""
    return int(hex_digest[: _HASH_BITS // 4], 16) / float(1 << _HASH_BITS)


def _seeded_order(key: str, seed: int) -> str:
    """A per-seed pseudo-random but content-determined sort key."""
    return hashlib.sha1(f"{seed}\x00{key}".encode()).hexdigest()


def deduplicate_examples(examples: Iterable[dict]) -> list[dict]:
    """Drop repeated texts: keep the first copy; drop a text altogether if its copies disagree on label.

    Args:
        examples: Dicts with ``"text"``, ``"label"`` and optionally ``"text_pair"``.

    Returns:
        The surviving examples, in their original relative order.
    """
    first: dict[str, dict] = {}
    conflicting: set[str] = set()
    for example in examples:
        key = example_key(example)
        kept = first.setdefault(key, example)
        if kept["label"] != example["label"]:
            conflicting.add(key)
    return [example for key, example in first.items() if key not in conflicting]


def split_examples(
    examples: Iterable[dict], fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[list[dict], list[dict], list[dict]]:
    """Assign each example to train/dev/test by its content hash (see the module docstring).

    Args:
        examples: De-duplicated examples (duplicates would land in the same split, so they are harmless
            for leakage, but they still count twice).
        fractions: ``(train, dev)`` fractions; test gets the rest. Each split's realised size is
            binomially close to its fraction, not exact, which is the price of row-order independence.

    Returns:
        ``(train, dev, test)``, each sorted by example key.

    Raises:
        ValueError: If the fractions are negative or sum to more than 1.
    """
    train_fraction, dev_fraction = fractions
    if train_fraction < 0 or dev_fraction < 0 or train_fraction + dev_fraction > 1:
        raise ValueError(f"`fractions` must be non-negative with a sum <= 1, got {fractions}")
    keyed = sorted((example_key(example), index, example) for index, example in enumerate(examples))
    splits: tuple[list[dict], list[dict], list[dict]] = ([], [], [])
    for key, _, example in keyed:
        u = _unit_interval(key)
        which = 0 if u < train_fraction else 1 if u < train_fraction + dev_fraction else 2
        splits[which].append(example)
    return splits


def _largest_remainder_quotas(counts: dict[int, int], n: int) -> dict[int, int]:
    """Split ``n`` across labels in proportion to ``counts`` (Hamilton's method; ties -> lower label)."""
    total = sum(counts.values())
    exact = {label: n * count / total for label, count in counts.items()}
    quotas = {label: int(value) for label, value in exact.items()}
    leftover = n - sum(quotas.values())
    by_remainder = sorted(counts, key=lambda label: (-(exact[label] - quotas[label]), label))
    for label in by_remainder[:leftover]:
        quotas[label] += 1
    return quotas


def stratified_subsample(examples: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """Pick ``n`` examples keeping label proportions (largest-remainder rounding), deterministically.

    Within each label, examples are ranked by ``sha1(seed, key)``, so the choice depends only on content
    and seed: the same seed gives the same subset whatever the input order, and a larger ``n`` gives a
    superset of a smaller one only approximately (quotas are re-rounded).

    Args:
        examples: Dicts with ``"text"`` and ``"label"``.
        n: How many to keep; ``n >= len(examples)`` returns all of them (in seeded order).
        seed: Selects a different subset.

    Returns:
        The subsample, ordered by the seeded hash (labels interleaved).

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    ranked = sorted(
        (_seeded_order(example_key(example), seed), index, example) for index, example in enumerate(examples)
    )
    if n >= len(ranked):
        return [example for _, _, example in ranked]
    counts: dict[int, int] = {}
    for _, _, example in ranked:
        counts[example["label"]] = counts.get(example["label"], 0) + 1
    remaining = _largest_remainder_quotas(counts, n)
    chosen = []
    for _, _, example in ranked:
        if remaining[example["label"]] > 0:
            remaining[example["label"]] -= 1
            chosen.append(example)
    return chosen


@dataclass(frozen=True)
class TextClassificationData:
    """A text-classification dataset with fixed train/dev/test splits.

    Examples are dicts ``{"text": str, "label": int}``, plus ``"text_pair": str`` for two-text tasks;
    ``label`` indexes ``label_names``.
    """

    name: str
    """Dataset name, e.g. ``"trec6"``."""
    label_names: tuple[str, ...]
    """Label names in id order: ``label_names[example["label"]]``."""
    train: list[dict]
    """Training examples."""
    dev: list[dict]
    """Validation examples (model selection, early stopping)."""
    test: list[dict]
    """Held-out examples (report once)."""

    def __post_init__(self) -> None:
        if not self.label_names:
            raise ValueError("`label_names` must not be empty")
        for split in SPLIT_NAMES:
            for example in getattr(self, split):
                if not 0 <= example["label"] < len(self.label_names):
                    raise ValueError(
                        f"`{split}` has label {example['label']!r} outside 0..{len(self.label_names) - 1}"
                    )

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(label_names)``), e.g. for a classifier head."""
        return len(self.label_names)

    def split(self, split: str) -> list[dict]:
        """Return one split by name.

        Args:
            split: ``"train"``, ``"dev"`` or ``"test"``.

        Raises:
            ValueError: For any other name.
        """
        if split not in SPLIT_NAMES:
            raise ValueError(f"`split` must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
        examples: list[dict] = getattr(self, split)
        return examples

    def subsample(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """Deterministic, label-stratified subsample of a split (see :func:`stratified_subsample`).

        Args:
            split: ``"train"``, ``"dev"`` or ``"test"``.
            n: Number of examples; the whole split if ``n`` is at least its size.
            seed: Selects a different subset.

        Returns:
            A new list (the dicts are shared with the split).
        """
        return stratified_subsample(self.split(split), n, seed)

    def label_counts(self, split: str) -> dict[str, int]:
        """Examples per label name in a split, in label-id order (zeros included)."""
        counts = dict.fromkeys(self.label_names, 0)
        for example in self.split(split):
            counts[self.label_names[example["label"]]] += 1
        return counts
