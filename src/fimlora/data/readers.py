"""Read user data files into plain records, then into classification or SFT examples.

Supported inputs: ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines, or one JSON list of objects),
all UTF-8 text, and a directory written by ``datasets.Dataset.save_to_disk`` (needs the optional
``datasets`` package, imported only then). Every problem raises :class:`~fimlora.errors.DataError` with a
one-line message naming the problem and its fix (a binary, UTF-16 or otherwise non-UTF-8 file included);
row numbers count data rows from 1 (the CSV header is not a row).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fimlora.errors import DataError

__all__ = ["load_classification_file", "load_sft_file", "read_records", "read_text_file"]

_SUPPORTED = ".csv, .tsv, .jsonl, .json, or a datasets.save_to_disk folder"
# Markers that `datasets.save_to_disk` writes (a Dataset, or a DatasetDict of them).
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def read_records(path: str | Path) -> list[dict]:
    """Read a data file (or ``save_to_disk`` folder) into a list of dicts, one per row.

    Args:
        path: A ``.csv`` / ``.tsv`` file (header row required), a ``.jsonl`` / ``.json`` file (one object
            per line, or a single JSON list of objects), or a ``datasets.save_to_disk`` directory.

    Returns:
        The rows, in file order. CSV/TSV values are strings.

    Raises:
        DataError: Missing path, unsupported extension, malformed, empty, binary or non-UTF-8 file.
        ModuleNotFoundError: A ``save_to_disk`` folder was given but ``datasets`` is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        records = _read_saved_dataset(path)
    else:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            records = _read_delimited(path, delimiter="," if suffix == ".csv" else "\t")
        elif suffix in (".jsonl", ".json"):
            records = _read_json(path)
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {_SUPPORTED}")
    if not records:
        raise DataError(f"{path}: the file has no data rows; add examples or pick another file")
    return records


def read_text_file(path: str | Path, *, expected: str = "UTF-8 text data file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark, common in spreadsheet exports, is dropped).

    Args:
        path: the file.
        expected: what the file should be, for the fix in the message (e.g. ``"BIG-bench task.json"``).

    Raises:
        DataError: the file cannot be read, is binary (holds NUL bytes), is UTF-16, or is not valid UTF-8
            (the message names the line and the offending byte).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"{path}: cannot read it ({error.strerror}); check the path and its permissions"
        ) from None
    # Before the NUL check: UTF-16 (Excel's "Unicode text") is text, but every other byte of it is NUL.
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: the file is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw:
        raise DataError(f"{path}: this is a binary file, not text (it contains NUL bytes); pass a {expected}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}: not UTF-8 text (line {line} has the byte 0x{raw[error.start]:02x}); re-save it as UTF-8, "
            "e.g. iconv -f cp1252 -t UTF-8"
        ) from None


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    """CSV/TSV with a header row; rows whose field count differs from the header are errors."""
    kind = "CSV" if delimiter == "," else "TSV"
    text = read_text_file(path, expected=f"UTF-8 {kind} file with a header row")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: the file is empty; it needs a header row and at least one data row")
        records = []
        for row_number, row in enumerate(reader, start=1):
            # DictReader files surplus fields under the key None and fills missing ones with None.
            if None in row or None in row.values():
                raise DataError(
                    f"{path}: data row {row_number} does not have the header's {len(reader.fieldnames)} "
                    f"fields; quote values that contain {delimiter!r} or fix the row"
                )
            records.append(dict(row))
    except csv.Error as error:  # e.g. a field over the csv module's size limit: not a real CSV file
        raise DataError(
            f"{path}: not a valid {kind} file (line {reader.line_num}: {error}); fix the file"
        ) from None
    return records


def _read_json(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines (blank lines ignored)."""
    text = read_text_file(path, expected="UTF-8 .jsonl or .json file of objects")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; add examples or pick another file")
    if text.lstrip().startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error}); fix the file") from None
        return [_as_record(path, index, item) for index, item in enumerate(loaded, start=1)]
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {line_number} is not valid JSON ({error.msg}); write one object per line"
            ) from None
        records.append(_as_record(path, line_number, item, what="line"))
    return records


def _as_record(path: Path, number: int, item: Any, what: str = "item") -> dict:
    if not isinstance(item, dict):
        raise DataError(
            f"{path}: {what} {number} is a {type(item).__name__}, not an object; "
            'write each example as {"column": value, ...}'
        )
    return item


def _read_saved_dataset(path: Path) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` folder; a DatasetDict must hold exactly one split."""
    if not any((path / marker).exists() for marker in _SAVE_TO_DISK_MARKERS):
        raise DataError(
            f"{path}: a directory, but not one written by datasets.save_to_disk; use {_SUPPORTED}"
        )
    try:
        import datasets  # optional: only needed for this input type
    except ImportError:
        raise ModuleNotFoundError(
            f"{path} is a datasets.save_to_disk folder; reading it needs: pip install datasets",
            name="datasets",
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            splits = ", ".join(loaded)
            raise DataError(
                f"{path}: holds several splits ({splits}); point at one, e.g. {path / next(iter(loaded))}"
            )
        loaded = next(iter(loaded.values()))
    return [dict(row) for row in loaded]


def _column_value(path: Path, records: list[dict], row_number: int, column: str, option: str) -> Any:
    """``records[row_number - 1][column]``, or a DataError that lists the columns and the option to set."""
    row = records[row_number - 1]
    if column not in row:
        available = ", ".join(repr(name) for name in row) or "none"
        raise DataError(
            f"{path}: row {row_number} has no column {column!r} (columns: {available}); "
            f"set {option}= to the right column"
        )
    return row[column]


def _text_value(path: Path, records: list[dict], row_number: int, column: str, option: str) -> str:
    value = _column_value(path, records, row_number, column, option)
    if not isinstance(value, str):
        raise DataError(
            f"{path}: row {row_number}, column {column!r} holds {type(value).__name__} {value!r}, not text; "
            "fix the value or the column"
        )
    if not value.strip():
        raise DataError(
            f"{path}: row {row_number} has empty text in column {column!r}; fill or remove the row"
        )
    return value


def _int_like(value: Any) -> int | None:
    """An integer label id if ``value`` is one (int, integral float, or a string of digits), else None."""
    if isinstance(value, bool):  # bool is an int subclass, but True/False is not a class id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _infer_label_names(raw_labels: list[Any]) -> tuple[str, ...]:
    """Label names when none are given: ``"0".."max"`` for integer ids, else sorted unique strings."""
    ids = [label_id for label_id in map(_int_like, raw_labels) if label_id is not None]
    if len(ids) == len(raw_labels):
        return tuple(str(index) for index in range(max(ids) + 1))
    return tuple(sorted({str(label) for label in raw_labels}))


def _label_id(path: Path, row_number: int, raw: Any, label_names: tuple[str, ...], column: str) -> int:
    """Map a raw label (a name or an id) to an id in ``range(len(label_names))``."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DataError(
            f"{path}: row {row_number} has an empty label in column {column!r}; fill or remove the row"
        )
    # A name wins over an id reading, so label_names=("1", "0") maps "1" to 0 as the caller asked.
    if str(raw) in label_names:
        return label_names.index(str(raw))
    label_id = _int_like(raw)
    if label_id is not None and 0 <= label_id < len(label_names):
        return label_id
    raise DataError(
        f"{path}: row {row_number} has label {raw!r}, which is not among label_names "
        f"({', '.join(label_names)}) nor an id 0..{len(label_names) - 1}; fix the row or the label names"
    )


def load_classification_file(
    path: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[dict], tuple[str, ...]]:
    """Read a classification file into ``{"text", "label"[, "text_pair"]}`` examples.

    Labels may be names or integer ids. With ``label_names`` given, a name maps to its index and an id
    must lie in ``range(len(label_names))``. Without it, integer ids are kept and named ``"0".."max"``;
    otherwise the sorted unique label strings become the names.

    Args:
        path: Any input :func:`read_records` accepts.
        text_column: Column holding the text.
        text_pair_column: Column holding the second text of pair tasks (NLI, paraphrase), if any.
        label_column: Column holding the label.
        label_names: Label names in id order; inferred when None.

    Returns:
        ``(examples, label_names)``.

    Raises:
        DataError: A missing column, empty text, empty or unknown label (message names row and fix).
    """
    path = Path(path)
    records = read_records(path)
    raw_labels = [
        _column_value(path, records, row_number, label_column, "label_column")
        for row_number in range(1, len(records) + 1)
    ]
    names = tuple(label_names) if label_names is not None else _infer_label_names(raw_labels)
    if not names:
        raise DataError(f"{path}: label_names is empty; pass the class names in id order")
    examples = []
    for row_number, raw_label in enumerate(raw_labels, start=1):
        example: dict[str, Any] = {"text": _text_value(path, records, row_number, text_column, "text_column")}
        if text_pair_column is not None:
            example["text_pair"] = _text_value(
                path, records, row_number, text_pair_column, "text_pair_column"
            )
        example["label"] = _label_id(path, row_number, raw_label, names, label_column)
        examples.append(example)
    return examples, names


def load_sft_file(
    path: str | Path, *, prompt_column: str = "prompt", completion_column: str = "completion"
) -> list[dict]:
    """Read a supervised fine-tuning file into ``{"prompt": str, "completion": str}`` examples.

    Both fields must be non-empty text: a row without a prompt or a completion is almost always a
    broken export, and silently training on it would hide that.

    Args:
        path: Any input :func:`read_records` accepts.
        prompt_column: Column holding the prompt.
        completion_column: Column holding the target completion.

    Returns:
        The examples, in file order.

    Raises:
        DataError: A missing column or empty text (message names the row and the fix).
    """
    path = Path(path)
    records = read_records(path)
    return [
        {
            "prompt": _text_value(path, records, row_number, prompt_column, "prompt_column"),
            "completion": _text_value(path, records, row_number, completion_column, "completion_column"),
        }
        for row_number in range(1, len(records) + 1)
    ]
