"""Read GNU gettext ``.mo`` catalogs into (msgid, msgstr) entries, without the ``gettext`` module's caveats.

Why not :class:`gettext.GNUTranslations`: it keeps its parsed catalog in the private ``_catalog``, and it
decodes the header with UTF-8 before it knows the catalog's charset, so a Latin-1 catalog (Debian's
``mit-krb5.mo``) raises ``UnicodeDecodeError``. The format itself is short and documented in the GNU
gettext manual ("The Format of GNU MO Files"): a magic number (which also gives the byte order), a
revision, the number of strings N, and the offsets of two tables of N (length, offset) pairs, one for the
original strings and one for the translations. The translation of the empty msgid is the header, whose
``Content-Type`` line names the charset of every string in the file.

A msgid holding NUL is a plural entry (``singular NUL plural``, translations ``form0 NUL form1 ...``); a
msgid holding EOT (``\\x04``) carries a context (``context EOT msgid``). Both are reported as they are
(:class:`MoEntry` flags them); what to keep is the caller's choice.
"""

from __future__ import annotations

import codecs
import re
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MO_MAGIC", "MoEntry", "MoFormatError", "read_mo", "write_mo"]

MO_MAGIC = 0x950412DE
"""The magic number of a .mo file, read in the file's own byte order."""

_CHARSET = re.compile(r"charset=([A-Za-z0-9_.:-]+)", re.IGNORECASE)


class MoFormatError(ValueError):
    """A file that is not a well-formed .mo catalog (bad magic, tables outside the file, bad charset)."""


@dataclass(frozen=True)
class MoEntry:
    """One message of a catalog.

    Attributes:
        msgid: The original (English) text, without its context; the singular for a plural entry.
        msgstr: The translation; the first plural form for a plural entry.
        context: The ``msgctxt``, or ``None``.
        plural: Whether the entry has plural forms.
    """

    msgid: str
    msgstr: str
    context: str | None
    plural: bool


def read_mo(path: str | Path) -> list[MoEntry]:
    """Every message of a .mo file except the header, in the file's (msgid-sorted) order.

    Args:
        path: The catalog.

    Returns:
        The entries, decoded with the charset the header names (UTF-8 when it names none).

    Raises:
        MoFormatError: not a .mo file, a table reaching past the end, or an unknown charset.
    """
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise MoFormatError(f"{path}: too short for a .mo file ({len(data)} bytes)")
    order = next((o for o in ("<", ">") if struct.unpack(o + "I", data[:4])[0] == MO_MAGIC), None)
    if order is None:
        raise MoFormatError(f"{path}: not a .mo file (bad magic number)")
    _revision, count, originals, translations = struct.unpack(order + "4I", data[4:20])

    def string_at(table: int, index: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * index : table + 8 * index + 8])
        if offset + length > len(data):
            raise MoFormatError(f"{path}: string {index} reaches past the end of the file")
        return data[offset : offset + length]

    if max(originals, translations) + 8 * count > len(data):
        raise MoFormatError(f"{path}: string tables reach past the end of the file")
    raw = [(string_at(originals, i), string_at(translations, i)) for i in range(count)]
    header = next((t for o, t in raw if o == b""), b"")
    charset = _charset(header, path)
    entries = []
    for original, translated in raw:
        if original == b"":
            continue
        text = original.decode(charset)
        context = None
        if "\x04" in text:
            context, text = text.split("\x04", 1)
        plural = "\x00" in text
        entries.append(
            MoEntry(
                msgid=text.split("\x00", 1)[0],
                msgstr=translated.decode(charset).split("\x00", 1)[0],
                context=context,
                plural=plural,
            )
        )
    return entries


def _charset(header: bytes, path: str | Path) -> str:
    match = _CHARSET.search(header.decode("ascii", errors="replace"))
    name = match.group(1) if match else "utf-8"
    if name.upper() == "CHARSET":  # an unfilled template header
        name = "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise MoFormatError(f"{path}: unknown charset {name!r} in the header") from None


def write_mo(path: str | Path, messages: dict[str, str], *, charset: str = "utf-8") -> Path:
    """Write a little-endian .mo file (for tests and examples): ``messages`` maps msgid -> msgstr.

    A header naming ``charset`` is added as the empty msgid. Keys may hold ``context\\x04msgid`` or
    ``singular\\x00plural`` (values ``form0\\x00form1``), as in the format.

    Returns:
        ``path``.
    """
    items = sorted({"": f"Content-Type: text/plain; charset={charset}\n", **messages}.items())
    ids = [k.encode(charset) for k, _ in items]
    strs = [v.encode(charset) for _, v in items]
    count = len(items)
    originals = 28
    translations = originals + 8 * count
    offset = translations + 8 * count
    tables = b""
    blobs = b""
    for column in (ids, strs):
        for item in column:
            tables += struct.pack("<2I", len(item), offset + len(blobs))
            blobs += item + b"\x00"
    head = struct.pack("<7I", MO_MAGIC, 0, count, originals, translations, 0, 0)
    out = Path(path)
    out.write_bytes(head + tables + blobs)
    return out
