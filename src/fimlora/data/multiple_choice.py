"""Multiple-choice examples from BIG-bench ``task.json`` files (Srivastava et al., 2022, "Beyond the
Imitation Game"), for scoring decoders by the log-likelihood of each choice.

Only examples with ``target_scores`` (a mapping choice -> score) are multiple-choice; the answer is the
highest-scoring choice (the first one on ties, in file order). Prefixes such as ``example_input_prefix``
are left to the caller, who knows the prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path

from fimlora.data.readers import read_text_file
from fimlora.errors import DataError

__all__ = ["read_bigbench_multiple_choice"]


def read_bigbench_multiple_choice(task_json_path: str | Path) -> list[dict]:
    """Read the multiple-choice examples of a BIG-bench task.

    Args:
        task_json_path: Path to a BIG-bench ``task.json``.

    Returns:
        ``[{"input": str, "choices": list[str], "answer": int}, ...]`` where ``choices[answer]`` has the
        highest target score.

    Raises:
        DataError: Missing, binary or non-UTF-8 file, invalid JSON, no ``examples`` list, an example that is
            not an object or has no ``input`` / numeric ``target_scores``, or no example with ``target_scores``.
    """
    path = Path(task_json_path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a BIG-bench task.json")
    text = read_text_file(path, expected="UTF-8 BIG-bench task.json")
    try:
        task = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON ({error}); fix the file") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise DataError(f"{path}: no 'examples' list; is this a BIG-bench task.json?")
    examples = []
    for number, example in enumerate(task["examples"], start=1):
        if not isinstance(example, dict):
            raise DataError(
                f"{path}: example {number} is a {type(example).__name__}, not an object; is this a BIG-bench task.json?"
            )
        if example.get("target_scores"):
            examples.append(_multiple_choice_example(path, number, example))
    if not examples:
        raise DataError(f"{path}: no example has 'target_scores', so the task is not multiple-choice")
    return examples


def _multiple_choice_example(path: Path, number: int, example: dict) -> dict:
    scores = example["target_scores"]
    if (
        "input" not in example
        or not isinstance(scores, dict)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values())
    ):
        raise DataError(
            f"{path}: example {number} needs an 'input' and 'target_scores' mapping each choice to a number; "
            "fix the example"
        )
    choices = list(scores)
    # max() returns the first maximal element, which makes ties resolve to file order.
    answer = max(range(len(choices)), key=lambda index: scores[choices[index]])
    return {"input": str(example["input"]), "choices": choices, "answer": answer}
