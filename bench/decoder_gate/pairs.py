"""English -> German message pairs from installed gettext catalogs, split by program, pinned by hash.

Debian packages install their German translations as ``/usr/share/locale/de/LC_MESSAGES/*.mo``. Each
catalog maps an English message (msgid) to its German translation (msgstr): supervised translation data
that SmolLM2-135M, trained mostly on English, knows little of.

**Usable pair** (:func:`usable_text_pair`, then the token caps of :func:`extract_pairs`):

* singular messages only: plural entries (msgid ``singular NUL plural``) are skipped, since their forms
  depend on a count the prompt would not show; a context (``msgctxt``) is dropped and the text kept;
* both sides stripped of surrounding white space and non-empty, the source holding a word of two or more
  letters (pure format strings such as ``"%s: %d"`` teach no German), the target different from the source
  (untranslated names and codes carry no signal);
* at most :data:`MAX_SOURCE_TOKENS` source and :data:`MAX_TARGET_TOKENS` target tokens (long help texts
  would dominate the cost of a step; they are a small share of the messages);
* duplicates removed by source text: within a split the first pair wins (order: package, catalog file,
  msgid), and a source already in train is removed from dev and test, one already in dev from test, so
  no held-out source was trained on.

**Split by program**: a catalog belongs to the Debian package that installed it (``dpkg -S``), and whole
packages go to one split. Packages are visited in the order of the sha256 of their names; one with at most
:data:`MAX_HELDOUT_PACKAGE_PAIRS` usable pairs joins test until test holds :data:`HELDOUT_TARGET_PAIRS`
pairs, then dev likewise; every other package is train. Symbolic links to another catalog are read once.

**Pinned**: the sha256 of each split's pairs lives in ``pinned_pairs.json`` beside this module;
:func:`check_pinned` refuses a mismatch with one line naming the cause and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .mo_files import read_mo

__all__ = [
    "DEFAULT_LOCALE_DIR",
    "HELDOUT_TARGET_PAIRS",
    "MAX_HELDOUT_PACKAGE_PAIRS",
    "MAX_SOURCE_TOKENS",
    "MAX_TARGET_TOKENS",
    "PINNED_FILE",
    "SPLITS",
    "GatePairs",
    "Pair",
    "PairsMismatchError",
    "catalog_files",
    "check_pinned",
    "dpkg_owners",
    "extract_pairs",
    "pin_record",
    "split_packages",
    "usable_text_pair",
]

DEFAULT_LOCALE_DIR = Path("/usr/share/locale/de/LC_MESSAGES")
"""Where Debian packages install German gettext catalogs."""

MAX_SOURCE_TOKENS = 40
"""Longest source message kept, in tokens of the model's tokenizer."""

MAX_TARGET_TOKENS = 48
"""Longest target message kept, in tokens (German runs longer than English)."""

MAX_HELDOUT_PACKAGE_PAIRS = 1500
"""A package with more usable pairs stays in train, so no single program makes up a held-out split."""

HELDOUT_TARGET_PAIRS = 1500
"""Dev and test each take packages until they hold at least this many pairs (before deduplication)."""

SPLITS = ("train", "dev", "test")

PINNED_FILE = Path(__file__).with_name("pinned_pairs.json")
"""The pinned sha256 and size of each split, and the packages read, for the SmolLM2 tokenizer."""


_WORD = re.compile(r"[^\W\d_]{2,}")
"""Two or more letters in a row: a word, not a format directive such as ``%s``."""


class PairsMismatchError(RuntimeError):
    """The extracted pairs differ from the pinned ones (other catalogs installed, or other versions)."""


@dataclass(frozen=True)
class Pair:
    """One English -> German message.

    Attributes:
        source: The English msgid (stripped).
        target: The German msgstr (stripped).
        package: The Debian package that installed the catalog (the unit of the split).
        catalog: The catalog's file name, e.g. ``"coreutils.mo"``.
    """

    source: str
    target: str
    package: str
    catalog: str


@dataclass(frozen=True)
class GatePairs:
    """The three splits and the packages each holds."""

    train: list[Pair]
    dev: list[Pair]
    test: list[Pair]
    packages: dict[str, list[str]]
    """split -> the sorted package names assigned to it."""

    def split(self, name: str) -> list[Pair]:
        """The pairs of ``"train"``, ``"dev"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"`name` must be one of {SPLITS}, got {name!r}")
        pairs: list[Pair] = getattr(self, name)
        return pairs

    def sha256(self, name: str) -> str:
        """sha256 of a split: one canonical JSON line per pair (keys sorted), in split order."""
        digest = hashlib.sha256()
        for pair in self.split(name):
            digest.update(json.dumps(asdict(pair), sort_keys=True, ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def usable_text_pair(msgid: str, msgstr: str, *, plural: bool) -> tuple[str, str] | None:
    """The stripped ``(source, target)`` of a message, or ``None`` when it is not usable (module docstring)."""
    if plural:
        return None
    source, target = msgid.strip(), msgstr.strip()
    if not source or not target or source == target:
        return None
    if not _WORD.search(source):
        return None
    return source, target


def catalog_files(locale_dir: str | Path = DEFAULT_LOCALE_DIR) -> list[Path]:
    """The ``*.mo`` files of ``locale_dir``, sorted by name, links to a catalog already listed left out."""
    seen: set[Path] = set()
    out = []
    for path in sorted(Path(locale_dir).glob("*.mo")):
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        out.append(path)
    return out


def dpkg_owners(paths: Sequence[Path]) -> dict[Path, str]:
    """The Debian package that installed each file (``dpkg -S``, resolved links).

    Raises:
        PairsMismatchError: ``dpkg`` is missing or does not know a file (not a Debian-installed catalog).
    """
    queries = [str(p.resolve()) for p in paths]
    try:
        done = subprocess.run(["dpkg", "-S", *queries], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PairsMismatchError(
            "dpkg not found: the decoder gate reads catalogs of Debian packages"
        ) from None
    owners: dict[str, str] = {}
    for line in done.stdout.splitlines():
        package, _, file = line.partition(": ")
        if file:
            owners[file.strip()] = package.split(":")[0].split(",")[0].strip()
    missing = [q for q in queries if q not in owners]
    if missing:
        raise PairsMismatchError(f"dpkg -S knows no package for {missing[0]} (and {len(missing) - 1} more)")
    return {p: owners[q] for p, q in zip(paths, queries, strict=True)}


def split_packages(
    sizes: Mapping[str, int],
    *,
    heldout_pairs: int = HELDOUT_TARGET_PAIRS,
    max_heldout_package: int = MAX_HELDOUT_PACKAGE_PAIRS,
) -> dict[str, list[str]]:
    """Assign whole packages to test, dev and train (module docstring), deterministically.

    Args:
        sizes: package -> its number of usable pairs.
        heldout_pairs: Pairs test, then dev, take packages up to (at least).
        max_heldout_package: Larger packages stay in train.

    Returns:
        split -> sorted package names; every package in exactly one split.
    """
    order = sorted(sizes, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    filled = {"test": 0, "dev": 0}
    for package in order:
        target = next((s for s in ("test", "dev") if filled[s] < heldout_pairs), None)
        if target is None or sizes[package] > max_heldout_package or sizes[package] == 0:
            out["train"].append(package)
            continue
        out[target].append(package)
        filled[target] += sizes[package]
    return {name: sorted(packages) for name, packages in out.items()}


def extract_pairs(
    count_tokens: Callable[[str], int],
    *,
    locale_dir: str | Path = DEFAULT_LOCALE_DIR,
    owners: Callable[[Sequence[Path]], Mapping[Path, str]] = dpkg_owners,
    heldout_pairs: int = HELDOUT_TARGET_PAIRS,
    max_heldout_package: int = MAX_HELDOUT_PACKAGE_PAIRS,
) -> GatePairs:
    """Read every catalog, keep the usable pairs, split them by package and deduplicate (module docstring).

    Args:
        count_tokens: text -> its number of tokens (the model's tokenizer, no special tokens).
        locale_dir: The catalogs' directory.
        owners: paths -> the package of each (default :func:`dpkg_owners`; tests group by file).
        heldout_pairs: See :func:`split_packages` (tests use small catalogs).
        max_heldout_package: See :func:`split_packages`.

    Returns:
        The splits.

    Raises:
        PairsMismatchError: no catalog in ``locale_dir``.
    """
    files = catalog_files(locale_dir)
    if not files:
        raise PairsMismatchError(f"no *.mo catalogs in {locale_dir}: install the packages gate.md names")
    package_of = owners(files)
    by_package: dict[str, list[Pair]] = {}
    for path in files:
        package = package_of[path]
        for entry in read_mo(path):
            text = usable_text_pair(entry.msgid, entry.msgstr, plural=entry.plural)
            if text is None:
                continue
            source, target = text
            if count_tokens(source) > MAX_SOURCE_TOKENS or count_tokens(target) > MAX_TARGET_TOKENS:
                continue
            by_package.setdefault(package, []).append(Pair(source, target, package, path.name))
    assignment = split_packages(
        {p: len(v) for p, v in by_package.items()},
        heldout_pairs=heldout_pairs,
        max_heldout_package=max_heldout_package,
    )
    seen: set[str] = set()
    splits: dict[str, list[Pair]] = {}
    for name in SPLITS:  # train first: its sources are removed from dev and test
        pairs = sorted(
            (pair for package in assignment[name] for pair in by_package.get(package, [])),
            key=lambda q: (q.package, q.catalog, q.source),
        )
        splits[name] = list(_first_by_source(pairs, seen))
    return GatePairs(splits["train"], splits["dev"], splits["test"], assignment)


def _first_by_source(pairs: Iterable[Pair], seen: set[str]) -> Iterable[Pair]:
    for pair in pairs:
        if pair.source not in seen:
            seen.add(pair.source)
            yield pair


def pin_record(pairs: GatePairs) -> dict[str, object]:
    """What ``pinned_pairs.json`` holds: per split its sha256, size and packages."""
    return {
        name: {
            "sha256": pairs.sha256(name),
            "pairs": len(pairs.split(name)),
            "packages": pairs.packages[name],
        }
        for name in SPLITS
    }


def check_pinned(pairs: GatePairs, pinned: Mapping[str, object] | str | Path = PINNED_FILE) -> None:
    """Refuse pairs whose split hashes differ from the pinned ones.

    Args:
        pairs: Freshly extracted splits.
        pinned: The pin (a :func:`pin_record` mapping, or the JSON file holding one).

    Raises:
        PairsMismatchError: one line naming the first split that differs, the cause and the fix.
    """
    if not isinstance(pinned, Mapping):
        pinned = json.loads(Path(pinned).read_text(encoding="utf-8"))
    now = pin_record(pairs)
    for name in SPLITS:
        want = pinned[name]
        got = now[name]
        if not isinstance(want, Mapping) or not isinstance(got, Mapping) or want["sha256"] != got["sha256"]:
            w = want if isinstance(want, Mapping) else {}
            g = got if isinstance(got, Mapping) else {}
            raise PairsMismatchError(
                f"decoder gate pairs differ from the pinned ones: {name} split has {g.get('pairs')} pairs "
                f"(pinned {w.get('pairs')}), sha256 {str(g.get('sha256'))[:12]} (pinned "
                f"{str(w.get('sha256'))[:12]}); cause: other Debian packages (or versions) installed their "
                "German catalogs here; fix: install the packages and versions listed in "
                "docs/results/decoder/gate.md, or re-pin with `python -m bench.decoder_gate pin` and report it"
            )
