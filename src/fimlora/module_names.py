"""Module names as layer index + kind (``bert.encoder.layer.3.attention.self.query`` -> ``(3,
"attention.self.query")``): the rows and columns of every rank table and heatmap. Pure standard library."""

from __future__ import annotations

import re

__all__ = ["split_module_name", "split_with_prefix", "strip_common"]

# ASCII digits only: str.isdigit() also accepts characters such as "²", which int() rejects.
_LAYER_INDEX = re.compile(r"[0-9]+")


def split_module_name(name: str) -> tuple[int | None, str]:
    """Split a module name into its layer index and its kind.

    The layer index is the *last* purely numeric dotted component that is followed by further
    components; the kind is everything after it. PEFT prefixes (``base_model.model.``) are
    therefore irrelevant. Nested lists (e.g. ``layers.3.experts.7.w1``) give the innermost index.

    Examples:
        >>> split_module_name("bert.encoder.layer.3.attention.self.query")
        (3, 'attention.self.query')
        >>> split_module_name("model.layers.11.mlp.down_proj")
        (11, 'mlp.down_proj')
        >>> split_module_name("lm_head")
        (None, 'lm_head')

    Args:
        name: Dotted module name, as in ``model.named_modules()``.

    Returns:
        ``(layer, kind)``; ``(None, name)`` when no numeric component is followed by another.
    """
    layer, _, kind = split_with_prefix(name)
    return layer, kind


def split_with_prefix(name: str) -> tuple[int | None, str, str]:
    """Like :func:`split_module_name`, also returning the part before the layer index."""
    parts = name.split(".")
    # The final component is never a layer index: "layers.3" with nothing after it is a block,
    # not a module inside layer 3.
    for i in range(len(parts) - 2, -1, -1):
        if _LAYER_INDEX.fullmatch(parts[i]):
            return int(parts[i]), ".".join(parts[:i]), ".".join(parts[i + 1 :])
    return None, "", name


def strip_common(prefixes: list[str]) -> dict[str, str]:
    """Map each dotted prefix to what distinguishes it: common leading and trailing parts removed.

    ``["model.encoder.layers", "model.decoder.layers"]`` -> ``{..: "encoder", ..: "decoder"}``.
    Removing a component sequence shared by all keeps distinct prefixes distinct.
    """
    split = [p.split(".") if p else [] for p in prefixes]
    lead = 0
    while all(len(s) > lead for s in split) and len({s[lead] for s in split}) == 1:
        lead += 1
    rest = [s[lead:] for s in split]
    trail = 0
    while all(len(s) > trail for s in rest) and len({s[len(s) - 1 - trail] for s in rest}) == 1:
        trail += 1
    return {p: ".".join(s[: len(s) - trail]) for p, s in zip(prefixes, rest, strict=True)}
