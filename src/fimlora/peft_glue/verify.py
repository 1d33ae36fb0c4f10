"""Run-time checks that an adapter fimlora rewrote still computes what it should, on any PEFT release.

fimlora rewrites adapters in several places (AdaLoRA -> LoRA, training-time resizing, compress, export).
Each rewrite relies on how the installed PEFT defines a layer's forward, its scale and its saved modules;
a release that changes one of them would otherwise yield an adapter that loads fine and computes something
else (peft 0.22 did exactly that to the AdaLoRA conversion: ``unload()`` stopped carrying trained
``modules_to_save`` copies into the base model). So every rewrite is checked where it happens, cheaply:

* a module's **update** is what its adapter adds to the base layer's output on a fixed random probe
  ``X`` (``rows x in``, seeded by the module's input width): measured through PEFT's own forward
  (:func:`forward_updates`, ``layer(X) - base_layer(X)`` in eval mode) or computed from factors
  (:func:`factor_update`, ``s * X A^T B^T``), for an adapter's config and tensors at the ranks and scales
  the installed PEFT builds from that config (:func:`adapter_updates`: PEFT reads the patterns, not
  fimlora). Cost: ``rows`` forward rows per module, no ``out x in`` matrix;
* :func:`check_updates` compares two such maps with a tolerance set by the dtype and by the rounding of
  the base output, and raises :class:`~fimlora.errors.AdapterCheckError` naming the module, the installed
  PEFT/transformers and the tested versions, so the caller stops before writing anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any, NamedTuple

import torch
from torch import nn

from fimlora.errors import AdapterCheckError
from fimlora.peft_glue.layers import lora_root

__all__ = [
    "TESTED_VERSIONS",
    "ProbedUpdate",
    "check_updates",
    "factor_update",
    "forward_updates",
    "installed_versions",
    "layer_update",
    "peft_module_scales",
    "probe_inputs",
    "adapter_updates",
    "version_advice",
]

TESTED_VERSIONS = {"peft": ("0.15.0", "0.22.0"), "transformers": ("4.53.2", "5.25.0")}
"""The oldest and newest releases CI has run the whole test suite on (constraints/oldest.txt and the
resolver's newest on the day). Named in every :class:`AdapterCheckError` as the way out."""

_PROBE_ROWS = 4
_PROBE_SEED = 1234


class ProbedUpdate(NamedTuple):
    """One module's update on its probe, ``(rows, out)`` float32 on the CPU, and the size of the rounding
    error it may carry (from subtracting the base output, or from the factors' own rounding)."""

    value: torch.Tensor
    noise: float


def installed_versions() -> str:
    """``"peft X, transformers Y"`` as installed (``unknown`` without package metadata)."""
    found = []
    for name in ("peft", "transformers"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} unknown")
    return ", ".join(found)


def version_advice() -> str:
    """The end of every :class:`AdapterCheckError`: what is installed, that nothing was written, the way out."""
    tested = "; ".join(f"{n} {lo} to {hi}" for n, (lo, hi) in TESTED_VERSIONS.items())
    return (
        f"under {installed_versions()}; nothing was written. fimlora is tested with {tested}: install one of "
        "those and run again (and please report this)"
    )


def probe_inputs(
    in_features: int, *, rows: int = _PROBE_ROWS, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> torch.Tensor:
    """The fixed probe ``X`` of a module with ``in_features`` inputs, shape ``(rows, in_features)``: the same
    values wherever it is drawn, so a measured and a computed update see the same input."""
    gen = torch.Generator().manual_seed(_PROBE_SEED + int(in_features))
    return torch.randn(rows, int(in_features), generator=gen).to(device=device, dtype=dtype)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


@torch.no_grad()
def factor_update(a: torch.Tensor, b: torch.Tensor, scale: float) -> ProbedUpdate:
    """``s * X A^T B^T`` for factors A ``(r, in)`` and B ``(out, r)``, on the module's probe."""
    x = probe_inputs(a.shape[1], dtype=torch.float32)
    value = (x @ a.detach().float().cpu().T @ b.detach().float().cpu().T) * float(scale)  # (rows, out)
    noise = 8 * _eps(a.dtype) * float(value.abs().max()) if value.numel() else 0.0
    return ProbedUpdate(value, noise)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off for the probe; every submodule's own training flag is put back afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _tuner_layers(model: nn.Module) -> dict[str, Any]:
    """Module name (relative to the transformers model) -> PEFT tuner layer (LoRA, AdaLoRA, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = lora_root(model)
    return {
        n: m for n, m in root.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")
    }


@torch.no_grad()
def layer_update(layer: Any) -> ProbedUpdate | None:
    """What a PEFT tuner layer's active adapter adds to its base layer's output on the module's probe,
    measured through PEFT's own forward (``layer(X) - base_layer(X)``, eval mode, hooks included); None
    for a base layer that is not a linear map (weight not 2-D)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    x = probe_inputs(int(layer.in_features), dtype=weight.dtype, device=weight.device)
    with _eval_mode(layer):
        full = layer(x).float()
        plain = base(x).float()
    noise = 16 * _eps(weight.dtype) * (float(full.abs().max()) + float(plain.abs().max()))
    return ProbedUpdate((full - plain).cpu(), noise)


def forward_updates(model: nn.Module) -> dict[str, ProbedUpdate]:
    """Module name -> :func:`layer_update` of every PEFT tuner layer (LoRA, AdaLoRA) of ``model``."""
    out: dict[str, ProbedUpdate] = {}
    for name, layer in _tuner_layers(model).items():
        found = layer_update(layer)
        if found is not None:
            out[name] = found
    return out


def check_updates(
    expected: Mapping[str, ProbedUpdate],
    got: Mapping[str, ProbedUpdate],
    *,
    what: str,
    rtol: float = 1e-3,
) -> None:
    """Raise unless every module's update agrees; a module on one side only must have a zero update.

    Args:
        expected: module name -> the update the rewrite must preserve.
        got: module name -> the update the rewritten adapter computes.
        what: the rewrite, for the message (e.g. ``"the AdaLoRA -> LoRA conversion"``).
        rtol: tolerance relative to the module's largest update entry (on top of the rounding noise).

    Raises:
        AdapterCheckError: the first module that differs, with the difference and the installed versions.
    """
    for name in sorted(set(expected) | set(got)):
        e, g = expected.get(name), got.get(name)
        ref = e if e is not None else g
        assert ref is not None
        e_val = e.value if e is not None else torch.zeros_like(ref.value)
        g_val = g.value if g is not None else torch.zeros_like(ref.value)
        if e_val.shape != g_val.shape:
            raise AdapterCheckError(
                f"{what} changed module {name}'s output shape ({tuple(e_val.shape)} -> {tuple(g_val.shape)}) "
                + version_advice()
            )
        diff = float((e_val - g_val).abs().max()) if e_val.numel() else 0.0
        scale = max(float(e_val.abs().max()), float(g_val.abs().max())) if e_val.numel() else 0.0
        allowed = (e.noise if e is not None else 0.0) + (g.noise if g is not None else 0.0) + rtol * scale
        if diff > allowed:
            raise AdapterCheckError(
                f"{what} changed module {name}'s update by {diff:.3g} (largest entry {scale:.3g}) "
                + version_advice()
            )


def peft_module_scales(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, float]]:
    """Module name -> ``(rank, scale)`` as the installed PEFT builds them from a LoRA ``adapter_config.json``.

    PEFT itself is asked: a LoRA adapter with ``config``'s r, alpha, rsLoRA and patterns is put on a tree of
    meta-device linear layers at exactly these names (``(in, out)`` each; no memory, no base weights), and
    each layer's ``r`` and ``scaling`` are read back. Targets, saved modules and inits are the tree's own.
    """
    import dataclasses

    from peft import LoraConfig, get_peft_model

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    keep = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    cfg = LoraConfig(
        **{k: config[k] for k in keep if k in fields and config.get(k) is not None},
        target_modules=sorted(shapes),
    )
    with torch.device("meta"):
        tree = nn.Module()
        for name, (n_in, n_out) in shapes.items():
            parent = tree
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(n_in, n_out, bias=False))
        with torch.random.fork_rng(devices=[]):
            model = get_peft_model(tree, cfg)
    layers = _tuner_layers(model)
    return {n: (int(layers[n].r["default"]), float(layers[n].scaling["default"])) for n in shapes}


def adapter_updates(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, what: str = "the adapter"
) -> dict[str, ProbedUpdate]:
    """Module name -> the update a LoRA adapter (``adapter_config.json`` as a dict, its tensors by saved name)
    makes on its probe, at the rank and scale the installed PEFT gives it on loading
    (:func:`peft_module_scales`).

    Raises:
        AdapterCheckError: PEFT would build a module at another rank than its tensors have.
    """
    prefix = "base_model.model."
    factors = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            name = stem[len(prefix) :] if stem.startswith(prefix) else stem
            factors[name] = (a, tensors[stem + ".lora_B.weight"])
    built = peft_module_scales(
        config, {n: (int(a.shape[1]), int(b.shape[0])) for n, (a, b) in factors.items()}
    )
    out = {}
    for name, (a, b) in factors.items():
        rank, scale = built[name]
        if rank != a.shape[0]:
            raise AdapterCheckError(
                f"{what}: PEFT builds module {name} at rank {rank} but its tensors have rank {a.shape[0]} "
                + version_advice()
            )
        out[name] = factor_update(a, b, scale)
    return out
