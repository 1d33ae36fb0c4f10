"""Fetch the BIG-bench task files the decoder suite reads (Srivastava et al., 2022, "Beyond the Imitation Game").

BIG-bench's ``task.json`` files ship only inside the ``bigbench==1.0.0`` sdist on PyPI (358 MB), and
``pip download bigbench`` fails on the package's direct-URL dependency. This step downloads that one file
with urllib (or takes a local copy), checks its sha256, and streams through the archive extracting only
``bigbench/benchmark_tasks/<task>/task.json`` and its subtasks' ``<task>/<subtask>/task.json``. Nothing
else is unpacked and the archive is not kept.

Usage::

    python -m bench.suites.bigbench_fetch                          # the decoder suite's default tasks
    python -m bench.suites.bigbench_fetch --tasks social_iqa winowhy --sdist /tmp/bigbench-1.0.0.tar.gz

The files land in ``$FIMLORA_BIGBENCH_DIR`` if set, else ``~/.cache/fimlora/bigbench/benchmark_tasks``:
the folder the decoder suite reads. Rerunning is cheap: tasks already there are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from fimlora.io import staged_directory

__all__ = [
    "BIGBENCH_SDIST_SHA256",
    "BIGBENCH_SDIST_URL",
    "FETCH_TASKS",
    "BigbenchFetchError",
    "default_bigbench_dir",
    "fetch_bigbench_tasks",
    "main",
]

BIGBENCH_SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
"""PyPI's ``bigbench==1.0.0`` sdist, the only packaged copy of BIG-bench's task files."""

BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

FETCH_TASKS: tuple[str, ...] = (
    "social_iqa",
    "strategyqa",
    "winowhy",
    "goal_step_wikihow",
    "epistemic_reasoning",
    "vitaminc_fact_verification",
)
"""Fetched by default: the decoder suite's tasks plus two spare multiple-choice tasks."""

FETCH_COMMAND = "python -m bench.suites.bigbench_fetch"
"""The command that fills the cache; error messages name it."""

_TASK_NAME = re.compile(r"[A-Za-z0-9_]+")
_MEMBER = re.compile(r"(?:^|/)bigbench/benchmark_tasks/([A-Za-z0-9_]+)/(?:([A-Za-z0-9_]+)/)?task\.json")
_CHUNK = 1 << 20


class BigbenchFetchError(RuntimeError):
    """The sdist could not be downloaded, failed its checksum, or lacks a requested task."""


def default_bigbench_dir() -> Path:
    """``$FIMLORA_BIGBENCH_DIR``, else ``~/.cache/fimlora/bigbench/benchmark_tasks``."""
    env = os.environ.get("FIMLORA_BIGBENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fimlora" / "bigbench" / "benchmark_tasks"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``target`` (which the caller deletes on failure)."""
    print(f"bigbench_fetch: downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except (urllib.error.URLError, OSError) as error:
        raise BigbenchFetchError(
            f"could not download {url} ({error}). Fix: download that file by any other means and run "
            f"`{FETCH_COMMAND} --sdist PATH`, or set $FIMLORA_BIGBENCH_DIR to an existing BIG-bench "
            "bigbench/benchmark_tasks folder"
        ) from None


def _verify(path: Path, sha256: str) -> None:
    actual = _sha256_of(path)
    if actual != sha256:
        raise BigbenchFetchError(
            f"{path}: sha256 {actual} does not match the expected {sha256}; the file is truncated or is not "
            f"bigbench-1.0.0.tar.gz. Fix: delete it and rerun `{FETCH_COMMAND}` (or pass the right --sdist)"
        )


def _extract_tasks(sdist: Path, tasks: Iterable[str], dest: Path) -> dict[str, list[Path]]:
    """Stream through the archive once and install each wanted task folder under ``dest``.

    Each task's files go into its own :func:`fimlora.io.staged_directory` next to ``dest/<task>``, moved
    into place only when every requested task was found, so ``dest/<task>/task.json`` existing means
    that task is complete (and a failure leaves nothing behind).
    """
    wanted = list(dict.fromkeys(tasks))
    written: dict[str, list[Path]] = {task: [] for task in wanted}
    with contextlib.ExitStack() as stack:
        staging = {task: stack.enter_context(staged_directory(dest / task)) for task in wanted}
        # "r|gz" reads the archive as a stream: no seeking, no index of all members, no full extraction.
        with tarfile.open(sdist, mode="r|gz") as archive:
            for member in archive:
                match = _MEMBER.search(member.name)
                if not member.isfile() or match is None or match.group(1) not in staging:
                    continue
                task, subtask = match.groups()
                # The path is built from the regex groups ([A-Za-z0-9_]+), never from the member name.
                relative = Path(subtask, "task.json") if subtask else Path("task.json")
                source = archive.extractfile(member)
                if source is None:
                    continue
                (staging[task] / relative).parent.mkdir(parents=True, exist_ok=True)
                with source, (staging[task] / relative).open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                written[task].append(dest / task / relative)
        missing = sorted(task for task, paths in written.items() if not paths)
        if missing:  # raised inside the stack: every staged task folder is removed, none moved
            raise BigbenchFetchError(
                f"{sdist}: no bigbench/benchmark_tasks/<task>/task.json for {missing}; check the task names "
                "(they are the folder names of BIG-bench's benchmark_tasks)"
            )
    return written


def fetch_bigbench_tasks(
    tasks: Sequence[str] = FETCH_TASKS,
    dest: str | os.PathLike[str] | None = None,
    *,
    sdist: str | os.PathLike[str] | None = None,
    url: str = BIGBENCH_SDIST_URL,
    sha256: str = BIGBENCH_SDIST_SHA256,
    force: bool = False,
) -> Path:
    """Make ``dest/<task>/task.json`` (and subtask files) exist for every task; return ``dest``.

    Args:
        tasks: BIG-bench task folder names, e.g. ``("social_iqa", "winowhy")``.
        dest: Output folder (default :func:`default_bigbench_dir`).
        sdist: A local copy of the sdist; without it the sdist is downloaded from ``url`` into a temporary
            file next to ``dest`` and deleted afterwards.
        url: Where to download the sdist.
        sha256: Expected sha256 of the sdist (checked for a local file too).
        force: Extract again even if every task's ``task.json`` is already there.

    Raises:
        ValueError: A task name that is not a plain folder name.
        BigbenchFetchError: Download failure, checksum mismatch, or a task not in the archive.
    """
    for task in tasks:
        if not _TASK_NAME.fullmatch(task):
            raise ValueError(f"`tasks` must be BIG-bench folder names like 'social_iqa', got {task!r}")
    root = Path(dest) if dest is not None else default_bigbench_dir()
    todo = [task for task in dict.fromkeys(tasks) if force or not (root / task / "task.json").is_file()]
    if not todo:
        print(f"bigbench_fetch: all {len(tasks)} tasks already in {root}", flush=True)
        return root
    root.mkdir(parents=True, exist_ok=True)
    if sdist is not None:
        local = Path(sdist)
        if not local.is_file():
            raise BigbenchFetchError(f"--sdist {local}: no such file")
        _verify(local, sha256)
        written = _extract_tasks(local, todo, root)
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=".bigbench-sdist-", suffix=".tar.gz", dir=root.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _download(url, tmp)
            _verify(tmp, sha256)
            written = _extract_tasks(tmp, todo, root)
        finally:
            tmp.unlink(missing_ok=True)
    for task in todo:
        print(f"bigbench_fetch: {task}: {len(written[task])} task.json file(s)", flush=True)
    print(f"bigbench_fetch: tasks are in {root}", flush=True)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog=FETCH_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dest",
        help="output folder (default: $FIMLORA_BIGBENCH_DIR or ~/.cache/fimlora/bigbench/benchmark_tasks)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(FETCH_TASKS), help="BIG-bench task folder names")
    parser.add_argument("--sdist", help="local bigbench-1.0.0.tar.gz instead of downloading it")
    parser.add_argument("--url", default=BIGBENCH_SDIST_URL, help="where to download the sdist")
    parser.add_argument("--force", action="store_true", help="extract again even if the files are there")
    args = parser.parse_args(argv)
    try:
        fetch_bigbench_tasks(args.tasks, args.dest, sdist=args.sdist, url=args.url, force=args.force)
    except (BigbenchFetchError, ValueError) as error:
        print(f"bigbench_fetch: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
