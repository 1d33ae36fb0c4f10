"""Command-line options generated from dataclasses, and layered run configuration.

One piece of code turns a dataclass into flags (:func:`add_dataclass_options`): one flag per field, its
help text the docstring written under the field (:func:`field_docs`), its type, choices and default from
the annotation. ``fimlora``'s run options (:class:`~fimlora.run_config.RunConfig` and its sections),
``fimlora eval``'s (:class:`~fimlora.recipes.EvalConfig`) and ``fimlora demo``'s
(:class:`~fimlora.demo.DemoConfig`) are all made this way, so help is written once.

Configuration is layered: defaults < a YAML/JSON file (:func:`load_config_file`) < flags < ``--set
section.key=value`` overrides (:func:`apply_overrides`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.errors import UsageError

__all__ = [
    "OptionSection",
    "add_dataclass_options",
    "apply_overrides",
    "coerce",
    "deep_merge",
    "field_docs",
    "field_types",
    "flag_name",
    "load_config_file",
    "parse_count",
    "section_values",
]


# ---- field docstrings as help text ---------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass body (the single source of help).

    Args:
        cls: a dataclass whose fields are each followed by a string literal, PEP 257 "attribute docstring"
            style (as :class:`fimlora.FimConfig`).

    Returns:
        Docstrings with whitespace collapsed, fields inherited from dataclass bases included; fields without
        one are absent.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring overrides its base's for the same field
        if klass is not object and dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """The field docstrings written in ``cls``'s own body (not its bases')."""
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
    """Field name -> resolved type annotation of a dataclass (strings from ``__future__`` resolved, each in the
    module of the class that declares it)."""
    return typing.get_type_hints(cls)


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
        UsageError: missing file, a directory, a binary or non-UTF-8 file, unsupported suffix, parse error,
            or not a mapping.
    """
    from fimlora.data.readers import read_text_file
    from fimlora.errors import DataError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"config file {p} is a directory; pass a YAML or JSON file to --config")
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist; check the --config path")
    try:
        text = read_text_file(p, expected="YAML or JSON config file (UTF-8 text)")
    except DataError as e:  # binary, UTF-16, not UTF-8, unreadable: the message names the file and the fix
        raise UsageError(f"config file {e}") from None
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


# ---- dataclass -> argparse -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptionSection:
    """How one dataclass becomes a group of flags.

    Attributes:
        section: prefix of each flag's ``dest`` (``"train"`` -> ``train.lr``); ``""`` for top-level fields.
        cls: the dataclass.
        rename: field -> flag name where the field's own name would be ambiguous (``alpha`` -> ``lora-alpha``).
        skip: fields that get no flag.
        required: fields whose flag must be given.
        title: the help group's title (default: ``"<section> options (<Class>)"``).
    """

    section: str
    cls: type
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    title: str | None = None


def flag_name(name: str) -> str:
    """``text_pair_column`` -> ``--text-pair-column``."""
    return "--" + name.replace("_", "-")


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is list for a in typing.get_args(annotation))
    return False


def _list_item_type(annotation: Any) -> Any:
    """``list[int]`` -> ``int``; ``list[str] | str`` -> ``str``; anything else -> ``str``."""
    candidates = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    for a in (annotation, *candidates):
        if typing.get_origin(a) is list and typing.get_args(a):
            return typing.get_args(a)[0]
    return str


def _metavar(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is typing.Literal:
        return None
    return {int: "N", float: "X", str: "STR"}.get(annotation, "VALUE")


def add_dataclass_options(parser: argparse.ArgumentParser, spec: OptionSection) -> None:
    """One flag per dataclass field, help from the field docstring; unset flags leave the config alone.

    Values arrive as strings (lists: several strings) under ``dest = "<section>.<field>"`` and are
    converted by :func:`section_values`, so a file, a flag and ``--set`` go through the same checks.
    """
    docs, annotations = field_docs(spec.cls), field_types(spec.cls)
    group = parser.add_argument_group(spec.title or f"{spec.section or 'run'} options ({spec.cls.__name__})")
    for f in dataclasses.fields(spec.cls):
        if f.name in spec.skip:
            continue
        flag = flag_name(spec.rename.get(f.name, f.name))
        dest = f"{spec.section}.{f.name}" if spec.section else f.name
        help_text = docs.get(f.name, "").replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, dict | list):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in spec.required:
            kwargs["required"] = True
        base = _strip_optional(annotations[f.name])
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
        if _is_list(base):
            kwargs["nargs"] = "+"
        kwargs["metavar"] = _metavar(base)
        group.add_argument(flag, **kwargs)


def section_values(args: argparse.Namespace, spec: OptionSection) -> dict[str, Any]:
    """The flags of one section that were given, converted to their fields' types.

    Raises:
        UsageError: a value that does not fit its field (names the flag).
    """
    annotations = field_types(spec.cls)
    prefix = f"{spec.section}." if spec.section else ""
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(prefix) or (not prefix and "." in dest):
            continue
        name = dest[len(prefix) :]
        if name not in annotations or name in spec.skip:
            continue
        annotation = annotations[name]
        flag = flag_name(spec.rename.get(name, name))
        if isinstance(value, list):
            if value == ["all-linear"]:
                value = "all-linear"
            elif (item_type := _list_item_type(annotation)) is not str:
                value = [coerce(v, item_type, flag) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            value = coerce(value, annotation, flag)
        values[name] = value
    return values
