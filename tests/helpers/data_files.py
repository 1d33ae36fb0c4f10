"""Tiny deterministic data sets and file writers for the CLI, recipe and trainer tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from helpers.tiny_models import NEGATIVE, POSITIVE


def classification_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Deterministic sentiment sentences, labels ``pos``/``neg``, alternating."""
    rows = []
    for i in range(offset, offset + n):
        words = POSITIVE if i % 2 == 0 else NEGATIVE
        noun = ("movie", "film", "plot", "acting", "story")[i % 5]
        rows.append(
            {
                "text": f"the {noun} was {words[i % 6]} {words[(i // 6) % 6]}",
                "label": "pos" if i % 2 == 0 else "neg",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


_FACTS = [
    ("capital of france", "paris"),
    ("capital of england", "london"),
    ("capital of italy", "rome"),
    ("colour of the sky", "blue"),
    ("colour of grass", "green"),
    ("colour of the sea", "blue"),
]


def sft_rows(n: int) -> list[dict[str, str]]:
    """Prompt/completion pairs over a few facts, repeated."""
    return [{"prompt": f"what is the {q}", "completion": a} for q, a in (_FACTS * (n // len(_FACTS) + 1))[:n]]


def multiple_choice_rows() -> list[dict[str, object]]:
    return [
        {"input": "what is the capital of france", "choices": ["paris", "london", "rome"], "answer": 0},
        {"input": "what is the colour of grass", "choices": ["red", "green"], "answer": "green"},
        {"input": "what is the capital of italy", "choices": ["london", "rome"], "answer": 1},
    ]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
