"""A crash-safe result store: one JSON file per run under ``root/runs/<run_id>.json``.

Each record is written with :func:`fimlora.io.atomic_write_text` (a temporary file in the same directory,
fsynced, then moved into place with ``os.replace``). A crash at any point leaves either the old record or
the new one, never half a file; stray temporary files end in ``.tmp`` and are ignored by readers.

Several workers can share one store: a worker *claims* a run before starting it (``root/claims/<run_id>``,
created exclusively, holding the host, pid and the process's start time) and releases it when its record is
written. A claim whose process no longer exists (same host, pid gone or reused) or that was made on another
host (sessions do not overlap; a new session's machine sees old claims) is stale and is taken over. Claims
are never committed (``.gitignore``).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_text

from .experiment import RunSpec

__all__ = ["FINISHED_STATUS", "ResultStore"]

# Only this status counts as done; "failed" (or anything else) is retried on the next sweep.
FINISHED_STATUS = "ok"


class ResultStore:
    """Run records on disk, keyed by ``run_id``.

    Args:
        root: Directory of the store; records live in ``root/runs``. Created on first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def path_for(self, run_id: str) -> Path:
        """Return the file a record with this id is (or would be) stored in."""
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise ValueError(f"`run_id` is not a safe file name: {run_id!r}")
        return self.runs_dir / f"{run_id}.json"

    def has(self, run_id: str) -> bool:
        """Whether a record file exists for ``run_id`` (any status, readable or not)."""
        return self.path_for(run_id).is_file()

    def get(self, run_id: str) -> dict[str, Any]:
        """Return the record for ``run_id``.

        Raises:
            KeyError: If there is no record.
            ValueError: If the file exists but is not a JSON object.
        """
        path = self.path_for(run_id)
        if not path.is_file():
            raise KeyError(run_id)
        return _read_record(path)

    def put(self, record: dict[str, Any]) -> Path:
        """Write ``record`` atomically, replacing any earlier record of the same run.

        Args:
            record: JSON-serialisable dict with a ``run_id`` key (see ``record.make_record``).

        Returns:
            The path written.
        """
        run_id = record.get("run_id")
        if not isinstance(run_id, str):
            raise ValueError("`record` must have a string `run_id`")
        path = self.path_for(run_id)
        # Serialise before touching the disk: an unserialisable record must not leave a temp file behind.
        payload = json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n"
        return atomic_write_text(path, payload)

    def claim(self, run_id: str) -> bool:
        """Claim ``run_id`` for this process; False if a live process of this host holds it.

        A stale claim (see the module docstring) is replaced. The caller must :meth:`release` the claim.
        """
        path = self.root / "claims" / self.path_for(run_id).name
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = _process_identity(os.getpid())
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _claim_is_stale(path):
                    return False
                path.unlink(missing_ok=True)  # stale: take it over (a second try, then give up)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(mine, fh)
            return True
        return False

    def release(self, run_id: str) -> None:
        """Remove this process's claim on ``run_id`` (nothing if it holds none)."""
        path = self.root / "claims" / self.path_for(run_id).name
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if held == _process_identity(os.getpid()):
            path.unlink(missing_ok=True)

    def is_finished(self, run_id: str) -> bool:
        """Whether ``run_id`` has a readable record with ``"status": "ok"``."""
        return self._is_finished(run_id)

    def records(self) -> list[dict[str, Any]]:
        """Return every readable record, sorted by file name.

        Corrupt or unreadable files are skipped with a ``UserWarning`` naming the file, so one bad file
        (e.g. hand-edited) cannot take the whole report down; the run will be redone by ``pending``.
        """
        return list(self._iter_records())

    def pending(self, specs: Iterable[RunSpec]) -> list[RunSpec]:
        """Return the specs that still need running, in their given order, without duplicates.

        A run is finished only if its record is readable and has ``"status": "ok"``; failed runs and
        corrupt records are returned so they are retried.
        """
        todo: list[RunSpec] = []
        seen: set[str] = set()
        for spec in specs:
            run_id = spec.run_id
            if run_id in seen:
                continue
            seen.add(run_id)
            if not self._is_finished(run_id):
                todo.append(spec)
        return todo

    def _is_finished(self, run_id: str) -> bool:
        path = self.path_for(run_id)
        if not path.is_file():
            return False
        try:
            return _read_record(path).get("status") == FINISHED_STATUS
        except (OSError, ValueError):
            return False

    def _iter_records(self) -> Iterator[dict[str, Any]]:
        if not self.runs_dir.is_dir():
            return
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                yield _read_record(path)
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping unreadable result record {path}: {exc}", UserWarning, stacklevel=3)


def _process_identity(pid: int) -> dict[str, Any] | None:
    """Host, pid and start time (clock ticks since boot, from /proc) of a live process; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of stat; fields after the command name
    return {"host": socket.gethostname(), "pid": pid, "start": start}


def _claim_is_stale(path: Path) -> bool:
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unreadable (a crash while writing it): nobody can be holding it meaningfully
    if not isinstance(held, dict) or held.get("host") != socket.gethostname():
        return True
    return _process_identity(int(held.get("pid", -1))) != held


def _read_record(path: Path) -> dict[str, Any]:
    """Read one record; ``ValueError`` (incl. ``JSONDecodeError``) if it is not a JSON object."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data
