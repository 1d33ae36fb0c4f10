"""The protocol the studies share: which split each step reads, its tasks and seeds, and how two runs compare.

The full-length protocol (docs/results/full/README.md) makes every choice on dev splits and reads the test
split once per run, at the end. Several studies enforce and report it: ``selection``, ``variants`` and
``below_r2`` read dev-split records only; ``full_report`` and ``confirm`` read test-split records only; and
``variants``, ``below_r2`` and ``confirm`` all pair two configurations by (task, seed) and report the mean
difference with a 95% bootstrap CI. Each of them used to spell these out on its own; here they are stated
once, so a study cannot drift from the others (a different default split, another pairing rule).

What this module holds:

* the tasks and seeds of each step (:data:`TEST_TASKS`, :data:`TEST_SEEDS`, :data:`SELECTION_TASKS`,
  :data:`HELD_OUT_TASKS`, :data:`DEV_SEEDS`), the random-allocation :data:`CONTROLS` and issue 14's
  :data:`COMPRESS_FRACTIONS`;
* the split checks: :func:`eval_split` (a record's split; the runner's default is the test split),
  :func:`records_on_split` and :func:`check_dev_only`;
* the reading of records: :func:`variant_name`, :func:`accuracy_percent`, :func:`accuracy_cells`,
  :func:`of_seeds` / :func:`seeds_arg` (an interim report on complete seeds);
* the paired difference: :func:`paired_difference` and :func:`format_difference`;
* grids re-aimed at a split: :func:`split_overrides` and :func:`write_grid`.

The majority-class floor a study prints is ``bench.suites.data.majority_rates``: it reads the suites'
data, so it stays beside their loaders. Importing this module loads no torch (records are plain JSON).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.harness import paired_bootstrap_ci
from fimlora.io import atomic_write_text

__all__ = [
    "COMPRESS_FRACTIONS",
    "CONTROLS",
    "DEFAULT_SPLIT",
    "DEV_SEEDS",
    "HELD_OUT_TASKS",
    "SELECTION_TASKS",
    "TEST_SEEDS",
    "TEST_TASKS",
    "Cells",
    "TestSplitInSelection",
    "WrongSplit",
    "accuracy_cells",
    "accuracy_percent",
    "check_dev_only",
    "eval_split",
    "format_difference",
    "of_seeds",
    "paired_difference",
    "records_on_split",
    "seeds_arg",
    "split_overrides",
    "variant_name",
    "write_grid",
]

DEFAULT_SPLIT = "test"
"""The split a record was evaluated on when its spec sets no ``overrides.eval_split`` (the runner's default)."""

TEST_TASKS: tuple[str, ...] = ("trec6", "sms_spam", "bbc_news", "movie_sentiment", "tweet_sentiment")
"""The five encoder tasks of the test grid (the issue's protocol)."""

TEST_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""The seeds of the test grid."""

SELECTION_TASKS: tuple[str, ...] = ("trec6", "movie_sentiment", "sms_spam")
"""Tasks whose dev splits choose the variant (trec6 and movie_sentiment also chose the learning rates)."""

HELD_OUT_TASKS: tuple[str, ...] = ("bbc_news", "tweet_sentiment")
"""Tasks that take no part in any choice except the training length: the confirmation's test splits."""

DEV_SEEDS: tuple[int, ...] = (0, 1)
"""The seeds of the dev-split variant grids (and of the below-r2 grid, run under the same protocol)."""

CONTROLS: tuple[str, ...] = ("random", "fim-shuffled")
"""Random-allocation controls at FIM-LoRA's budget (see the methods of the same names)."""

COMPRESS_FRACTIONS: tuple[float, ...] = (0.5, 0.25)
"""Issue 14: the r8 adapters of the methods run at several budgets are also compressed after training to
these fractions of their LoRA parameters and evaluated (``extra.compress``), to compare with training at the
r4 and r2 counts directly."""

Cells = dict[tuple[str, str], dict[tuple[str, int], float]]
"""(variant or method, budget) -> (task, seed) -> accuracy in %."""

K = TypeVar("K")


class WrongSplit(ValueError):
    """A record evaluated on another split than the one a step reads."""


class TestSplitInSelection(WrongSplit):
    """A record evaluated on the test split reached a step that reads the dev split only (a choice)."""

    __test__ = False  # a name pytest would otherwise try to collect from test modules that import it


def eval_split(record: Mapping[str, Any]) -> str:
    """The split a record was evaluated on (:data:`DEFAULT_SPLIT` where its spec sets none)."""
    return str((record["spec"].get("overrides") or {}).get("eval_split", DEFAULT_SPLIT))


def records_on_split(
    records: Iterable[Mapping[str, Any]],
    split: str,
    *,
    reader: str,
    hint: str,
    error: type[WrongSplit] = WrongSplit,
) -> list[Mapping[str, Any]]:
    """The finished records (``status == "ok"``), each checked to have been evaluated on ``split``.

    Args:
        records: result-store records.
        split: the split the step reads (``"dev"`` or ``"test"``).
        reader: the step, as the error names it (e.g. ``"selection"``).
        hint: what to do about a record of another split, appended to the error in parentheses.
        error: the exception to raise.

    Raises:
        WrongSplit: (``error``) a finished record evaluated on another split, named by its run id.
    """
    out = []
    for record in records:
        if record.get("status") != "ok":
            continue
        actual = eval_split(record)
        if actual != split:
            raise error(
                f"record {record['run_id']} was evaluated on the {actual!r} split; {reader} reads "
                f"{split}-split records only ({hint})"
            )
        out.append(record)
    return out


def check_dev_only(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The finished records, each checked to have been evaluated on the dev split.

    Raises:
        TestSplitInSelection: a record whose spec does not say ``eval_split: dev`` (the default is test).
    """
    return records_on_split(
        records,
        "dev",
        reader="selection",
        hint="set overrides.eval_split: dev in the selection grid",
        error=TestSplitInSelection,
    )


def variant_name(record: Mapping[str, Any]) -> str:
    """The name a run is reported under: its ``overrides.variant`` label, else its method."""
    spec = record["spec"]
    return str((spec.get("overrides") or {}).get("variant", spec["method"]))


def accuracy_percent(record: Mapping[str, Any]) -> float:
    """A record's accuracy in percent."""
    return 100.0 * float(record["metrics"]["accuracy"])


def accuracy_cells(records: Iterable[Mapping[str, Any]]) -> Cells:
    """(variant, budget) -> (task, seed) -> accuracy (%) of ``records`` (already checked for their split),
    in the order the records come; a later record of the same cell replaces an earlier one."""
    cells: Cells = defaultdict(dict)
    for record in records:
        spec = record["spec"]
        cells[(variant_name(record), spec["budget"])][(spec["task"], int(spec["seed"]))] = accuracy_percent(
            record
        )
    return cells


def paired_difference(a: Mapping[K, float], b: Mapping[K, float]) -> dict[str, Any] | None:
    """``a`` minus ``b`` paired over the keys both have (sorted): ``{"diff", "ci": [low, high], "pairs"}``
    with the harness's 95% paired-bootstrap CI; None with fewer than 2 pairs (no interval)."""
    keys = sorted(set(a) & set(b))  # type: ignore[type-var]
    if len(keys) < 2:
        return None
    diff, low, high = paired_bootstrap_ci([a[k] for k in keys], [b[k] for k in keys])
    return {"diff": diff, "ci": [low, high], "pairs": len(keys)}


def format_difference(d: Mapping[str, Any] | None, *, pairs: bool = True) -> str:
    """``+d.dd [+l.ll, +h.hh] (n pairs)`` for a :func:`paired_difference`; ``–`` for None."""
    if d is None:
        return "–"
    text = f"{d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
    return f"{text} ({d['pairs']} pairs)" if pairs else text


def of_seeds(records: Iterable[Mapping[str, Any]], seeds: Sequence[int] | None) -> list[Mapping[str, Any]]:
    """The records of the given seeds (all of them for ``None``): an interim report on the complete seeds
    only, so that the first runs of the next seed do not make one cell's seeds differ from the rest.

    Raises:
        ValueError: a given seed has no record (a typo, or a seed not yet begun), naming the seeds that do.
    """
    if seeds is None:
        return list(records)
    records = list(records)
    present = {int(r["spec"]["seed"]) for r in records}
    missing = sorted(set(seeds) - present)
    if missing:
        raise ValueError(
            f"--seeds: no records of seed {', '.join(map(str, missing))}; "
            f"the store holds seeds {' '.join(map(str, sorted(present))) or '(none)'}"
        )
    wanted = set(seeds)
    return [r for r in records if int(r["spec"]["seed"]) in wanted]


def seeds_arg(seeds: Sequence[int] | None) -> str:
    """``--seeds ...`` as it goes into a report's command line ('' for all seeds)."""
    return "" if seeds is None else " --seeds " + " ".join(str(s) for s in seeds)


def split_overrides(selection_grid: Mapping[str, Any], split: str) -> dict[str, Any]:
    """A selection grid's overrides for a grid that evaluates on ``split``: its settings (length, data sizes,
    ...) without its learning rate (each method's chosen rate replaces it) and with ``eval_split: split``."""
    overrides = {k: v for k, v in selection_grid["overrides"].items() if k not in ("lr", "eval_split")}
    overrides["eval_split"] = split
    return overrides


def write_grid(path: Path, header: str, grid: Mapping[str, Any]) -> Path:
    """Write a grid file: ``header`` (comment lines saying which command wrote it) and the grid as YAML in
    its own key order."""
    import yaml

    return atomic_write_text(path, header + yaml.safe_dump(dict(grid), sort_keys=False))
