"""Files that are never half-written, output directories that appear only when complete, and provenance.

One home for the I/O every part of fimlora (and ``bench/``) needs. Torch-free at import time.

* :func:`atomic_write_text` / :func:`atomic_write_json`: write to a temporary file in the same directory,
  fsync, then :func:`os.replace`, so a reader or a crash sees either the old file or the complete new one.
* :func:`staged_directory`: build a directory under a temporary name next to its destination and rename
  it into place on success (removed on failure).
* :class:`OutputDir`: a run's output directory, checked before any expensive work, staged in
  ``<parent>/.<name>.partial`` (kept after a crash when it holds checkpoints, so a run can be resumed).
* :func:`provenance` / :func:`write_provenance`: versions, git commit, command line, machine and time,
  written as ``run.json`` beside ``config.json``, so every number can be traced to how it was made.
  A copy of the tree sent to another machine names its commit with ``$FIMLORA_GIT_COMMIT`` (and
  ``$FIMLORA_GIT_DIRTY`` = ``1``/``0``), which win over git; a commit that cannot be read is ``None``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.errors import UsageError

__all__ = [
    "OutputDir",
    "atomic_write_json",
    "atomic_write_text",
    "git_state",
    "package_versions",
    "provenance",
    "staged_directory",
    "write_provenance",
]

TRACKED_PACKAGES = (
    "fimlora",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "safetensors",
    "numpy",
)
_SOURCE_DIR = Path(__file__).resolve().parent


# ---- files and directories -----------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Persist a rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; creates the parent directory.

    Returns:
        The path written (mode 0644, like an ordinary file).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one file system.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            # fsync before rename, otherwise a power loss can leave the new name pointing at empty data.
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a temporary file behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(data, indent=indent)`` plus a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def staged_directory(destination: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh directory next to ``destination``; on success it is renamed to ``destination``.

    Args:
        destination: the directory to create.
        replace: remove an existing ``destination`` first (otherwise the rename fails when it exists and
            is not empty, and the staged copy is discarded: another process won the race).

    On any exception the staged directory is removed and the exception propagates.
    """
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


class OutputDir:
    """Write a run into a staging directory and move it into place only when it succeeds.

    ``<parent>/.<name>.partial`` is the staging directory. It survives a crash or a kill (so a training
    run's checkpoints can be resumed from it) and is removed when the run ends with a usage error.

    Example::

        out = OutputDir("runs/a", overwrite=False)     # raises UsageError if runs/a exists
        with out as staging:
            ...write files under staging...
        # runs/a now holds them
    """

    def __init__(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False
    ) -> None:
        self.path = Path(path).expanduser()
        self.overwrite = overwrite
        self.resume = resume
        self.staging = self.path.parent / f".{self.path.name}.partial"
        self.check()

    def check(self) -> None:
        """Validate the destination before anything is computed or written.

        Raises:
            UsageError: the directory exists (without overwrite), a previous partial run exists (without
                resume/overwrite), or the parent cannot hold a new directory.
        """
        if self.path.exists() and not self.overwrite:
            raise UsageError(
                f"output directory {self.path} already exists; pass --overwrite to replace it or choose "
                "another --out"
            )
        if self.staging.exists() and not (self.resume or self.overwrite):
            raise UsageError(
                f"an interrupted run left {self.staging}; pass --resume to continue it or --overwrite to "
                "start over"
            )
        ancestor = self.path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UsageError(
                f"cannot create {self.path}: {ancestor} is not a directory; choose another --out"
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {ancestor} (permission denied); choose another --out")

    def __enter__(self) -> Path:
        if self.staging.exists() and self.overwrite and not self.resume:
            shutil.rmtree(self.staging)
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            probe = self.staging / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.staging.rmdir()
            raise UsageError(
                f"cannot write to {self.path.parent} ({e.strerror}); choose another --out"
            ) from None
        return self.staging

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.commit()
        elif issubclass(exc_type, UsageError) or not _has_checkpoint(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> None:
        """Move the staging directory into place (replacing an existing one only with overwrite)."""
        trash: Path | None = None
        if self.path.exists():
            if not self.overwrite:  # appeared while we were running
                raise UsageError(
                    f"output directory {self.path} appeared during the run; results are in {self.staging}"
                )
            trash = self.path.parent / f".{self.path.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.path, trash)
        os.replace(self.staging, self.path)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _has_checkpoint(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())


# ---- provenance ----------------------------------------------------------------------------------------


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (``None`` when not installed); imports nothing."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(repo: str | os.PathLike[str] | None = None, *, paths: Sequence[str] = ()) -> dict[str, Any]:
    """``{"commit": sha | None, "dirty": bool | None}`` of the checkout fimlora is imported from.

    ``$FIMLORA_GIT_COMMIT`` / ``$FIMLORA_GIT_DIRTY`` (``1``/``0``) win over git: a tree copied to another
    machine says where it came from (such a machine may hold a stale ``.git`` of its own). A missing git,
    a directory that is no checkout or a hung git give ``None``: provenance never aborts a run.

    Args:
        repo: a directory inside the checkout (default: fimlora's own source directory).
        paths: with paths (relative to ``repo``), "dirty" means a tracked file under them differs from the
            commit; without, any tracked file. Untracked files never count.
    """
    env_commit = os.environ.get("FIMLORA_GIT_COMMIT")
    if env_commit:
        env_dirty = os.environ.get("FIMLORA_GIT_DIRTY")
        return {"commit": env_commit, "dirty": None if env_dirty not in ("0", "1") else env_dirty == "1"}
    where = Path(repo) if repo is not None else _SOURCE_DIR
    commit = _git(where, "rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git(where, "status", "--porcelain", "--untracked-files=no", *(["--", *paths] if paths else []))
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance(*, seed: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git commit, command line, platform and time: what ``run.json`` records.

    The device and thread count are read from torch only when torch is already imported.
    """
    versions: dict[str, str | None] = {"python": platform.python_version(), **package_versions()}
    device = "cpu"
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                device = torch.cuda.get_device_name(0)
            versions["torch_threads"] = str(torch.get_num_threads())
    record: dict[str, Any] = {
        "seed": seed,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": versions,
        "git": git_state(),
        "platform": platform.platform(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    return record


def write_provenance(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    seed: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``config.json`` (+ ``config.yaml`` with PyYAML) and ``run.json`` into ``out_dir``.

    Returns:
        The ``run.json`` record.
    """
    out = Path(out_dir)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    with contextlib.suppress(ImportError):
        import yaml

        atomic_write_text(
            out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=True)
        )
    record = provenance(seed=seed, extra=extra)
    atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str) + "\n")
    return record
