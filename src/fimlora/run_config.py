"""The typed schema of a run: what ``fimlora train``/``allocate`` and ``config.json`` hold.

A run is layered: dataclass defaults < a YAML/JSON file (``--config``) < command-line flags <
``--set section.key=value`` overrides (:mod:`fimlora.cli_options`). Every section is a dataclass whose
fields carry their own docstrings, which are also the ``--help`` text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fimlora.config import FimConfig
from fimlora.errors import UsageError
from fimlora.tasks import DataSpec
from fimlora.training import TrainConfig

__all__ = ["DataSpec", "LoraSpec", "RunConfig"]

_T = TypeVar("_T")


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
    """Where the examples come from (:class:`fimlora.tasks.DataSpec`)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The LoRA adapter every method starts from."""
    fim: FimConfig = field(default_factory=FimConfig)
    """Calibration and allocation settings (:class:`fimlora.FimConfig`), used by ``fim`` and ``allocate``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings (:class:`fimlora.training.TrainConfig`)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the method's constructor (training-time methods), checked against it when the
    method is built: each method has its own options, listed by `fimlora methods`."""

    def __post_init__(self) -> None:
        # Sections may be given as mappings (a config file, --set overrides): validate them here, so a bad
        # option is a UsageError naming it before anything is loaded.
        self.data = _section(DataSpec, self.data, "data")
        self.lora = _section(LoraSpec, self.lora, "lora")
        self.fim = _section(FimConfig, self.fim, "fim")
        self.train = _section(TrainConfig, self.train, "train")
        if not isinstance(self.method_options, Mapping):
            raise UsageError(
                f"`method_options` must be a mapping of keyword arguments, got {type(self.method_options).__name__}"
            )

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
        try:
            return cls(**data)
        except TypeError as e:
            raise UsageError(f"invalid configuration: {e}") from None


_SECTION_ERRORS = {"fim": "invalid FIM option", "train": "invalid training option"}


def _section(cls: type[_T], value: Any, name: str) -> _T:
    """A section dataclass from itself or a mapping; unknown keys and invalid values name the option."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise UsageError(f"configuration section {name!r} must be a mapping, got {type(value).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(value) - valid
    if unknown:
        raise UsageError(
            f"unknown key(s) {sorted(unknown)} in section {name!r}; valid: {', '.join(sorted(valid))}"
        )
    try:
        return cls(**value)
    except (TypeError, ValueError) as e:  # UsageError included: the prefix says which section
        raise UsageError(f"{_SECTION_ERRORS.get(name, f'invalid {name} option')}: {e}") from None
