"""Run configuration, output directories and provenance for fimlora's recipes and CLI.

Every published number must be traceable to how it was made (lm-evaluation-harness style), so each run
writes next to its outputs:

* ``config.json`` (and ``config.yaml`` when PyYAML is installed): the fully resolved configuration;
* ``run.json``: seed, command line, package versions, git commit (and whether the tree was dirty), host
  device, start/end time.

A configuration is layered: dataclass defaults < a YAML/JSON file (``--config``) < command-line flags <
``--set section.key=value`` overrides. Option help comes from the dataclass field docstrings
(:func:`field_docs`), so it is written once.

Outputs are written into a staging directory next to the destination and renamed into place at the end
(:class:`OutputDir`), so an error never leaves a half-written run and an existing directory is never
clobbered without ``overwrite``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fimlora.errors import UsageError

__all__ = [
    "DataSpec",
    "LoraSpec",
    "RunConfig",
    "UsageError",
    "apply_overrides",
    "field_docs",
    "load_config_file",
    "parse_count",
]




# ---- configuration sections ----------------------------------------------------------------------------


@dataclass
class DataSpec:
    """Where the examples come from and how to read them."""

    train: str | None = None
    """Training data: a .csv/.tsv/.jsonl/.json file, a datasets.save_to_disk folder, or builtin:NAME."""

    eval: str | None = None
    """Evaluation data (same formats). Default for builtin:NAME: its test split; otherwise none."""

    text_column: str = "text"
    """Column with the text (classification)."""

    text_pair_column: str | None = None
    """Column with the second text of pair tasks (classification), if any."""

    label_column: str = "label"
    """Column with the label (classification): a name or an integer id."""

    label_names: list[str] | None = None
    """Label names in id order (classification). Default: inferred from the training labels."""

    prompt_column: str = "prompt"
    """Column with the prompt (sft)."""

    completion_column: str = "completion"
    """Column with the completion (sft); the loss is computed on these tokens only."""

    max_train: int | None = None
    """Keep at most this many training examples (a deterministic, label-stratified subsample for builtins)."""

    max_eval: int | None = None
    """Evaluate on at most this many examples (the first ones, in file order)."""

    max_length: int = 128
    """Truncate each tokenised example to this many tokens."""


@dataclass
class LoraSpec:
    """The LoRA adapter every method starts from (its r is the uniform baseline and the default budget)."""

    r: int = 8
    """LoRA rank of the uniform baseline; the default budget is uniform LoRA at this rank."""

    alpha: float = 16.0
    """LoRA alpha (scale alpha/r; fim keeps each module's scale with alpha_pattern)."""

    dropout: float = 0.05
    """Dropout on the LoRA input."""

    target_modules: list[str] | str = "all-linear"
    """Modules to adapt: "all-linear" or a list of module-name suffixes (e.g. query value)."""

    use_rslora: bool = False
    """Use rsLoRA scaling alpha/sqrt(r)."""


@dataclass
class RunConfig:
    """A complete, serialisable description of one run (what ``config.json`` holds)."""

    model: str = "minilm"
    """Base model: a local Hugging Face directory, a hub id (used offline when cached), a .gguf file, or "minilm" (the embedded MiniLM-L6)."""

    gguf_file: str | None = None
    """GGUF file name inside the --model directory (converted once to a cached safetensors directory)."""

    task: Literal["classification", "sft"] = "classification"
    """Task: "classification" (text[, text_pair], label) or "sft" (prompt, completion)."""

    method: str = "fim"
    """Rank-allocation method (see `fimlora methods`)."""

    seed: int = 0
    """Seed for the head/LoRA init, data order and dropout; the same seed gives the same run."""

    device: str = "auto"
    """Device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""

    data: DataSpec = field(default_factory=DataSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    fim: dict[str, Any] = field(default_factory=dict)
    """FimConfig fields (see fimlora.FimConfig)."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields (see fimlora.training.TrainConfig)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the method's constructor (training-time methods)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a (possibly partial) mapping; unknown keys are errors that name the key."""
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(
                f"unknown configuration key(s) {sorted(unknown)}; valid keys: "
                f"{', '.join(f.name for f in dataclasses.fields(cls))}"
            )
        kwargs: dict[str, Any] = dict(data)
        if "data" in data:
            kwargs["data"] = _section(DataSpec, data["data"], "data")
        if "lora" in data:
            kwargs["lora"] = _section(LoraSpec, data["lora"], "lora")
        return cls(**kwargs)


def _section(cls: type, value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise UsageError(f"configuration section {name!r} must be a mapping, got {type(value).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - valid
    if unknown:
        raise UsageError(
            f"unknown key(s) {sorted(unknown)} in section {name!r}; valid: {', '.join(sorted(valid))}"
        )
    return cls(**value)


# ---- field docstrings as help text ---------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass body (the single source of help).

    Args:
        cls: a dataclass whose fields are each followed by a string literal, PEP 257 "attribute docstring"
            style (as :class:`fimlora.FimConfig`).

    Returns:
        Docstrings with whitespace collapsed; fields without one are absent.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    if not isinstance(body, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    statements = body.body
    for node, following in zip(statements, statements[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass (strings from ``__future__`` resolved)."""
    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(module))


def parse_count(text: str | int) -> int:
    """Parse a count with an optional k/M/G suffix: ``"1.3M"`` -> 1300000, ``"250k"`` -> 250000.

    Raises:
        UsageError: not a positive count.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text).replace("_", ""))
    if not match:
        raise UsageError(f"{text!r} is not a count; write e.g. 1300000, 1.3M or 250k")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def coerce(value: str, annotation: Any, name: str) -> Any:
    """Convert a command-line string to a field's type (int, float, bool, str, Literal, list, optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        for candidate in non_none:
            with contextlib.suppress(UsageError):
                return coerce(value, candidate, name)
        raise UsageError(f"invalid value {value!r} for {name}")
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, Sequence):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        try:
            return parse_count(value) if re.search(r"[kKmMgG]$", value) else int(value)
        except ValueError:
            raise UsageError(f"{name} must be an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{name} must be a number, got {value!r}") from None
    if annotation is str:
        return value
    try:  # dicts and anything else: JSON
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ---- config files and overrides ------------------------------------------------------------------------


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON configuration file into a dict.

    Raises:
        UsageError: missing file, unsupported suffix, parse error, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist; check the --config path")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(
                    "YAML configs need PyYAML: pip install 'fimlora[cli]', or use JSON"
                ) from None
            data = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"config file {p} must end in .yaml, .yml or .json")
    except (json.JSONDecodeError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"cannot parse config file {p}: {e}") from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        raise UsageError(f"cannot parse config file {p}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of options, not a {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML/JSON scalars when possible).

    Example: ``["train.lr=1e-3", "lora.target_modules=[query,value]"]``.

    Raises:
        UsageError: an override without ``=``.
    """
    out = dict(config)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {item!r}")
        key, raw = item.split("=", 1)
        value = _parse_scalar(raw)
        parts = key.strip().split(".")
        node: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            node = {part: node}
        out = deep_merge(out, node)
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(raw)
    except ImportError:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    except Exception:
        return raw
