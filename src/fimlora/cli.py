"""The ``fimlora`` command line: a thin layer over the Python API, one public function per subcommand.

==========  =====================================================
subcommand  calls
==========  =====================================================
demo        :func:`fimlora.demo.run_demo`
allocate    :func:`fimlora.training.allocate`
train       :func:`fimlora.training.finetune`
eval        :func:`fimlora.tasks.evaluate_adapter`
plot        :func:`fimlora.report.plot_outputs`
export      :func:`fimlora.export_uniform`
compare     :func:`fimlora.report.compare_runs`
methods     lists :data:`fimlora.methods.METHODS`
==========  =====================================================

Run options are generated from the dataclasses (:class:`~fimlora.run_config.RunConfig`,
:class:`~fimlora.run_config.DataSpec`, :class:`~fimlora.run_config.LoraSpec`, :class:`fimlora.FimConfig`,
:class:`~fimlora.training.TrainConfig`); their help text is each field's docstring, so it is written once.
Errors the user can fix print one line ``fimlora: error: ...`` and exit with status 2, having written
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fimlora.run_config import (
    DataSpec,
    LoraSpec,
    RunConfig,
    UsageError,
    apply_overrides,
    coerce,
    deep_merge,
    field_docs,
    field_types,
    load_config_file,
)

__all__ = ["build_parser", "main"]

# (section in RunConfig, dataclass, {field: flag name}, fields not exposed as flags)
_TOP_SKIP = {"data", "lora", "fim", "train", "method_options", "method"}
_DATA_RENAME = {"train": "data", "eval": "eval-data"}
_LORA_RENAME = {"alpha": "lora-alpha", "dropout": "lora-dropout"}
_FIM_RENAME = {"seed": "fim-seed"}
_FIM_SKIP = {"show_progress", "extra"}
_TRAIN_SKIP: set[str] = set()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _sections() -> list[tuple[str, type, dict[str, str], set[str]]]:
    from fimlora.config import FimConfig
    from fimlora.training import TrainConfig

    return [
        ("", RunConfig, {}, _TOP_SKIP),
        ("data", DataSpec, _DATA_RENAME, set()),
        ("lora", LoraSpec, _LORA_RENAME, set()),
        ("fim", FimConfig, _FIM_RENAME, _FIM_SKIP),
        ("train", TrainConfig, {}, _TRAIN_SKIP),
    ]


def _add_dataclass_options(parser: argparse.ArgumentParser) -> None:
    """One flag per dataclass field, help from the field docstring; unset flags leave the config alone."""
    for section, cls, rename, skip in _sections():
        docs, types = field_docs(cls), field_types(cls)
        group = parser.add_argument_group(f"{section or 'run'} options ({cls.__name__})")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = _flag(rename.get(f.name, f.name))
            dest = f"{section}.{f.name}" if section else f.name
            annotation = types[f.name]
            help_text = docs.get(f.name, "").replace("%", "%%")
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is not None and not isinstance(default, (dict, list)):
                help_text += f" (default: {default})"
            kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
            base = _strip_optional(annotation)
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if typing.get_origin(base) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(base))
            if _is_list(base):
                kwargs["nargs"] = "+"
            kwargs["metavar"] = _metavar(base)
            group.add_argument(flag, **kwargs)


def _strip_optional(annotation: Any) -> Any:
    import types as _types

    if typing.get_origin(annotation) in (typing.Union, _types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _metavar(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is typing.Literal:
        return None
    return {int: "N", float: "X", str: "STR"}.get(annotation, "VALUE")


def _method_choices() -> list[str]:
    from fimlora.methods.base import METHODS, available_methods

    try:
        return available_methods()
    except Exception as e:  # a broken optional method module must not take the CLI down
        print(f"fimlora: warning: some methods failed to load ({type(e).__name__}: {e})", file=sys.stderr)
    return sorted(METHODS)


def _add_run_options(parser: argparse.ArgumentParser, *, method: bool = True) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of run options (flags override it)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any option by its config path, e.g. --set train.lr=1e-3 (repeatable; applied last)",
    )
    if method:
        choices = _method_choices()
        parser.add_argument(
            "--method",
            dest="method",
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"rank-allocation method: {', '.join(choices)} (default: fim)",
        )
    _add_dataclass_options(parser)


def _add_output(
    parser: argparse.ArgumentParser, *, required: bool, help_text: str, default: str | None = None
) -> None:
    parser.add_argument("--out", "-o", required=required, default=default, metavar="DIR", help=help_text)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (never done silently)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fimlora`` argument parser (subcommands: demo allocate train eval plot export compare methods)."""
    from fimlora import __version__

    parser = argparse.ArgumentParser(
        prog="fimlora",
        description="LoRA ranks from the empirical Fisher of LoRA-B gradients: allocate, train, evaluate, compare.",
    )
    parser.add_argument("--version", action="version", version=f"fimlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", help="uniform LoRA vs FIM-LoRA on the embedded MiniLM + movie sentiment, with a report"
    )
    _add_output(p, required=False, default="out", help_text="output directory (default: out)")
    _add_demo_options(p)

    p = sub.add_parser("allocate", help="calibrate and compute a FIM rank map (no training)")
    _add_output(p, required=False, help_text="write rank_map.json, rank_map.png, scores.json here")
    _add_run_options(p, method=False)

    p = sub.add_parser("train", help="fine-tune with a method and save the adapter, metrics and provenance")
    _add_output(p, required=True, help_text="output directory")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    _add_run_options(p)

    p = sub.add_parser("eval", help="evaluate a trained adapter (classification, sft loss, multiple choice)")
    p.add_argument(
        "adapter", metavar="ADAPTER", help="a `fimlora train` output directory or an adapter directory"
    )
    p.add_argument(
        "--data", required=True, metavar="FILE", help="evaluation data (csv, jsonl, json, builtin:NAME[:dev])"
    )
    p.add_argument(
        "--task", choices=["classification", "sft", "multiple_choice"], help="default: the trained task"
    )
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="examples per forward pass (default: 32)"
    )
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per example (default: as trained)")
    p.add_argument("--max-eval", type=int, metavar="N", help="evaluate the first N examples only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    for name in ("text_column", "text_pair_column", "label_column", "prompt_column", "completion_column"):
        default = {
            "text_column": "text",
            "label_column": "label",
            "prompt_column": "prompt",
            "completion_column": "completion",
        }.get(name)
        p.add_argument(_flag(name), default=default, help=field_docs(DataSpec)[name])
    p.add_argument("--out", "-o", metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("plot", help="draw a rank-map heatmap (and training curves of a run directory)")
    p.add_argument("source", metavar="SOURCE", help="rank_map.json, or a `fimlora train` output directory")
    _add_output(p, required=True, help_text="directory for rank_map.png (+ curves.png)")
    p.add_argument("--title", help="figure title")

    p = sub.add_parser(
        "export", help="write a single-rank (zero-padded, scale-folded) copy of an adapter for serving"
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory or `fimlora train` output directory")
    _add_output(p, required=True, help_text="output adapter directory")

    p = sub.add_parser("compare", help="compare `fimlora train` runs: metrics, rank-map agreement, curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="`fimlora train` output directories")
    _add_output(p, required=False, help_text="write report.md, report.html, curves.png, comparison.json here")

    sub.add_parser("methods", help="list the available rank-allocation methods")
    return parser


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    from fimlora.demo import DemoConfig

    docs, types = field_docs(DemoConfig), field_types(DemoConfig)
    for f in dataclasses.fields(DemoConfig):
        flag, annotation = _flag(f.name), types[f.name]
        kwargs: dict[str, Any] = {
            "dest": f"demo.{f.name}",
            "default": argparse.SUPPRESS,
            "help": docs.get(f.name, "").replace("%", "%%"),
        }
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(annotation)[0], **kwargs)
        else:
            parser.add_argument(flag, type=annotation, **kwargs)


# ---- resolving options -----------------------------------------------------------------------------


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """defaults < --config file < flags < --set overrides, coerced to each field's type."""
    config: dict[str, Any] = RunConfig().to_dict()
    if getattr(args, "config", None):
        config = deep_merge(config, load_config_file(args.config))
    types_by_section = {section: field_types(cls) for section, cls, _, _ in _sections()}
    flags: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "." not in dest and dest not in types_by_section[""]:
            continue
        section, _, name = dest.rpartition(".")
        annotation = types_by_section[section][name]
        if isinstance(value, list) and value == ["all-linear"]:
            value = "all-linear"
        elif isinstance(value, str):
            value = coerce(value, annotation, _flag(name))
        if section:
            flags.setdefault(section, {})[name] = value
        else:
            flags[name] = value
    config = deep_merge(config, flags)
    config = apply_overrides(config, getattr(args, "overrides", []) or [])
    try:
        return RunConfig.from_dict(config)
    except TypeError as e:
        raise UsageError(f"invalid configuration: {e}") from None


def _is_list(annotation: Any) -> bool:
    import types as _types

    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, _types.UnionType):
        return any(typing.get_origin(a) is list for a in typing.get_args(annotation))
    return False


# ---- subcommands -------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from fimlora.demo import DemoConfig, run_demo

    options = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("demo.")}
    summary = run_demo(args.out, DemoConfig(**options), overwrite=args.overwrite)
    print()
    print(summary["table"])
    print(f"\nwall time {summary['wall_seconds']:.0f} s; outputs in {args.out}/ (report.html, report.md)")
    return 0


def _cmd_allocate(args: argparse.Namespace) -> int:
    from fimlora.training import allocate

    run = resolve_run_config(args)
    rank_map = allocate(run, args.out, overwrite=args.overwrite)
    print(rank_map.format_table())
    meta = rank_map.metadata
    print(
        f"total rank {rank_map.total_rank}; LoRA params {meta.get('uniform_params')} (uniform) budget; bounds [{meta.get('r_min')}, {meta.get('r_max')}]"
    )
    if args.out:
        print(f"wrote {args.out}/rank_map.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fimlora.training import finetune

    run = resolve_run_config(args)
    metrics = finetune(run, args.out, overwrite=args.overwrite, resume=args.resume)
    print(
        json.dumps(
            {k: metrics[k] for k in ("method", "eval", "trainable_params", "lora_params", "train_seconds")},
            indent=2,
        )
    )
    print(f"wrote {args.out}/ (adapter/, rank_map.json, metrics.json, run.json)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fimlora.tasks import evaluate_adapter

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} already exists; pass --overwrite or choose another --out")
    columns = {
        k: getattr(args, k)
        for k in ("text_column", "text_pair_column", "label_column", "prompt_column", "completion_column")
    }
    metrics = evaluate_adapter(
        args.adapter,
        args.data,
        task=args.task,
        model=args.model,
        gguf_file=args.gguf_file,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_eval=args.max_eval,
        device=args.device,
        **columns,
    )
    shown = {k: v for k, v in metrics.items() if not k.startswith("predictions")}
    print(json.dumps(shown, indent=2))
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {out} ({e.strerror}); choose another --out") from None
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fimlora.report import plot_outputs

    paths = plot_outputs(args.source, args.out, overwrite=args.overwrite, title=args.title)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fimlora.io import OutputDir
    from fimlora.peft_glue import export_uniform

    src = Path(args.adapter)
    if (src / "adapter" / "adapter_config.json").is_file():
        src = src / "adapter"
    if not (src / "adapter_config.json").is_file():
        raise UsageError(
            f"{args.adapter} is not an adapter directory (no adapter_config.json); pass one written by save_pretrained or `fimlora train`"
        )
    OutputDir(
        args.out, overwrite=args.overwrite
    )  # validates the destination; export_uniform writes atomically
    try:
        out = export_uniform(src, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fimlora.report import compare_runs

    result = compare_runs(args.runs, args.out, overwrite=args.overwrite)
    from fimlora.report import markdown_table

    runs = result["runs"]
    print(markdown_table(list(runs[0]), [list(r.values()) for r in runs]))
    for a in result["rank_agreement"]:
        print(
            f"{a['a']} vs {a['b']}: spearman {a.get('spearman')}, kendall {a.get('kendall')}, L1 {a.get('l1')}"
        )
    if args.out:
        print(f"wrote {args.out}/report.md and report.html")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from fimlora.methods.base import METHODS

    for name in _method_choices():
        doc = (METHODS[name].__doc__ or "").strip().splitlines()
        print(f"{name:10s} {doc[0] if doc else ''}")
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "allocate": _cmd_allocate,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "plot": _cmd_plot,
    "export": _cmd_export,
    "compare": _cmd_compare,
    "methods": _cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run one subcommand, map user errors to ``fimlora: error: ...`` and status 2."""
    from fimlora.data import DataError
    from fimlora.training import TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, DataError) as e:
        print(f"fimlora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"fimlora: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fimlora: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
