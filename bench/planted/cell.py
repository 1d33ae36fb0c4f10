"""One planted cell: plant a teacher, train a LoRA student to match it with one map, score it on held-out text.

The student starts from the base model (LoRA on every linear matrix of the transformer blocks) and is
trained with fimlora's own loop (:func:`fimlora.training.train_adapter`) and the cell's method; the loss is
given through the protocol's ``loss_fn`` (to ``prepare``, for calibration, and to every training step):
the mean squared error between the student's and the teacher's last hidden states over real tokens
(:func:`hidden_state_mse`). The teacher runs alongside, without gradients, on each batch.

Data: real text from a packaged corpus (default fimlora's builtin ``movie_sentiment``, review snippets;
labels unused). The training split feeds the student (a seeded order, one pass for the default 200 steps
of 16), its last ``planting_texts`` snippets give the activations the planted directions are drawn from,
and the metric is read on the first ``n_eval`` snippets of the dev split (pilots and choices) or the test
split (the reported runs, read once at the end of each run).

Every method gets the same budget: the LoRA parameters of uniform LoRA at rank ``budget_rank``,
``P = budget_rank * sum_m (in_m + out_m)``, and the same bounds ``[r_min, r_max]`` where it honours them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .methods import ORACLE, FixedRanksMethod, build_method, oracle_ranks
from .metrics import gap_closed, map_agreement
from .patterns import PlantedRanks, planted_ranks
from .teacher import collect_inputs, plant_updates

__all__ = [
    "CellConfig",
    "CellData",
    "block_linears",
    "hidden_state_mse",
    "load_cell_data",
    "run_cell",
    "run_cell_on",
]


@dataclass(frozen=True)
class CellConfig:
    """Everything one planted cell depends on (with the model and data it is given).

    Attributes:
        pattern: planting pattern (:data:`bench.planted.patterns.PATTERNS`).
        strength: the planted singular values as a fraction of each module's largest one.
        budget_rank: the budget is uniform LoRA at this rank, counted in parameters.
        method: a registered method, or ``"oracle"``.
        seed: the planting, the student's LoRA init and data order.
        steps, batch_size, lr: fimlora's loop (AdamW, 6 % warm-up then linear decay, clip 1.0).
        r_min, r_max: rank bounds of every method that honours them and of the oracle (``r_max`` None:
            ``4 * budget_rank``).
        calibration_batches: batches a calibrating method reads (the first training batches).
        alpha_ratio: ``lora_alpha = alpha_ratio * budget_rank`` (module scales kept by alpha_pattern).
        dropout: LoRA dropout (0: matching a teacher is deterministic).
        eval_split: ``"dev"`` (pilots, choices) or ``"test"`` (reported runs).
        planted: the planted ranks of each pattern.
    """

    pattern: str
    strength: float
    budget_rank: int
    method: str
    seed: int
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    r_min: int = 1
    r_max: int | None = None
    calibration_batches: int = 8
    alpha_ratio: float = 2.0
    dropout: float = 0.0
    eval_split: str = "test"
    planted: PlantedRanks = field(default_factory=PlantedRanks)

    def __post_init__(self) -> None:
        if self.eval_split not in ("dev", "test"):
            raise ValueError(f"`eval_split` must be 'dev' or 'test', got {self.eval_split!r}")
        if self.budget_rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("`budget_rank`, `steps` and `batch_size` must be >= 1")

    @property
    def bounds(self) -> tuple[int, int]:
        """``(r_min, r_max)`` of every method and the oracle."""
        return self.r_min, self.r_max if self.r_max is not None else 4 * self.budget_rank


@dataclass
class CellData:
    """A base model and tokenised text (each row ``{"input_ids": [...]}``).

    Attributes:
        load_model: returns a fresh base model (PEFT wraps models in place, so each cell gets its own).
        pad_id: the tokenizer's padding id.
        train_rows, dev_rows, test_rows: the corpus' splits.
        planting_rows: the rows whose activations the planted directions come from.
        description: the model and corpus, for records.
    """

    load_model: Callable[[], nn.Module]
    pad_id: int
    train_rows: list[dict[str, list[int]]]
    dev_rows: list[dict[str, list[int]]]
    test_rows: list[dict[str, list[int]]]
    planting_rows: list[dict[str, list[int]]]
    description: dict[str, Any]


def load_cell_data(
    model: str = "minilm",
    *,
    corpus: str = "movie_sentiment",
    max_length: int = 64,
    n_eval: int = 512,
    planting_texts: int = 128,
) -> CellData:
    """The embedded MiniLM (``"minilm"``, without its pooler) and a builtin corpus, tokenised.

    Raises:
        ValueError: a model other than ``"minilm"`` (the decoder's KL cells are not written yet).
    """
    if model != "minilm":
        raise ValueError(f"planted cells run on 'minilm' only for now, got {model!r}")
    from transformers import AutoModel, AutoTokenizer

    from fimlora.data import load_builtin_dataset
    from fimlora.models import embedded_model_dir

    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_builtin_dataset(corpus)

    def encode(examples: Sequence[dict[str, Any]]) -> list[dict[str, list[int]]]:
        ids = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)["input_ids"]
        return [{"input_ids": list(row)} for row in ids]

    train = encode(data.train)
    return CellData(
        load_model=lambda: AutoModel.from_pretrained(path, add_pooling_layer=False).eval(),
        pad_id=int(tokenizer.pad_token_id),
        train_rows=train[:-planting_texts],
        dev_rows=encode(data.dev[:n_eval]),
        test_rows=encode(data.test[:n_eval]),
        planting_rows=train[-planting_texts:],
        description={"model": model, "corpus": corpus, "max_length": max_length, "n_eval": n_eval},
    )


def collate_padded(pad_id: int) -> Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Rows -> ``input_ids`` and ``attention_mask`` of shape (batch, longest row), right-padded."""

    def collate(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def hidden_state_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Sum over real tokens of the per-token mean squared error, and the number of tokens.

    Args:
        student, teacher: last hidden states, shape (batch, seq, hidden).
        mask: attention mask, shape (batch, seq); padding (0) is left out.
    """
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum(), int(mask.sum())


def block_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every ``nn.Linear`` inside a numbered transformer block."""
    from fimlora.rankmap import split_module_name

    return {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and split_module_name(n)[0] is not None
    }


def mean_loss(
    model: nn.Module, teacher: nn.Module, rows: Sequence[dict[str, list[int]]], pad_id: int
) -> float:
    """Token-averaged hidden-state MSE of ``model`` against ``teacher`` on ``rows`` (batches of 64)."""
    collate = collate_padded(pad_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = collate(rows[start : start + 64])
            loss, n = hidden_state_mse(
                model(**batch).last_hidden_state, teacher(**batch).last_hidden_state, batch["attention_mask"]
            )
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count


def run_cell(config: CellConfig, data: CellData) -> dict[str, Any]:
    """Run one cell; returns the harness's ``RunOutcome`` (see :func:`run_cell_on`)."""
    torch.manual_seed(config.seed)
    return run_cell_on(config, data.load_model(), data)


def run_cell_on(config: CellConfig, base: nn.Module, data: CellData) -> dict[str, Any]:
    """Plant a teacher in ``base``, train the cell's student, and score it.

    Returns:
        A ``RunOutcome`` mapping: ``metrics`` (``gap_closed``, ``student_loss``, ``base_loss``,
        ``lora_param_ratio``, and the map's ``spearman``/``auc`` against the planted ranks where defined),
        ``trainable_params`` (the LoRA parameters trained), the seconds, and ``extra`` (the planted,
        oracle and chosen maps, the budget, the teacher's relative update norms).
    """
    from peft import LoraConfig

    from fimlora.training import TrainConfig, train_adapter

    started = time.perf_counter()
    for module in base.modules():  # the base's own dropout would be noise the teacher does not have
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    collate = collate_padded(data.pad_id)
    shapes = block_linears(base)
    names = sorted(shapes)
    planting = [collate(data.planting_rows[i : i + 32]) for i in range(0, len(data.planting_rows), 32)]
    inputs = collect_inputs(base, names, planting, max_rows=2048)
    planted = planted_ranks(
        config.pattern,
        names,
        config.seed,
        ranks=config.planted,
        max_rank={n: min(s) for n, s in shapes.items()},
    )
    teacher, relative = plant_updates(base, planted, inputs, strength=config.strength, seed=config.seed)
    eval_rows = data.dev_rows if config.eval_split == "dev" else data.test_rows
    base_loss = mean_loss(base, teacher, eval_rows, data.pad_id)
    costs = {n: i + o for n, (i, o) in shapes.items()}
    budget = config.budget_rank * sum(costs.values())
    r_min, r_max = config.bounds
    oracle = oracle_ranks(planted, costs, budget_params=budget, r_min=r_min, r_max=r_max)
    if config.method == ORACLE:
        method: Any = FixedRanksMethod(ranks=dict(oracle), seed=config.seed)
    else:
        method = build_method(
            config.method,
            budget_params=budget,
            r_min=r_min,
            r_max=r_max,
            calibration_batches=config.calibration_batches,
            seed=config.seed,
        )

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(**batch).last_hidden_state
        total, count = hidden_state_mse(model(**batch).last_hidden_state, target, batch["attention_mask"])
        return total / count

    lora_config = LoraConfig(
        r=config.budget_rank,
        lora_alpha=config.alpha_ratio * config.budget_rank,  # type: ignore[arg-type]
        lora_dropout=config.dropout,
        target_modules=names,
    )
    setup_seconds = time.perf_counter() - started
    result = train_adapter(
        base,
        lora_config,
        method,
        data.train_rows,
        collate,
        TrainConfig(
            max_steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            checkpoint_every=None,
            progress=False,
        ),
        seed=config.seed,
        device="cpu",
        loss_fn=loss_fn,
        desc=f"{config.pattern}-{config.method}-r{config.budget_rank}-s{config.seed}",
    )
    t_eval = time.perf_counter()
    student_loss = mean_loss(result.model, teacher, eval_rows, data.pad_id)
    eval_seconds = time.perf_counter() - t_eval
    chosen = _base_names(dict(result.rank_map), names)
    agreement = map_agreement(chosen, planted)
    ratio = result.lora_params / budget
    metrics = {
        "gap_closed": gap_closed(student_loss, base_loss),
        "student_loss": student_loss,
        "base_loss": base_loss,
        "lora_param_ratio": ratio,
        **{k: v for k, v in agreement.items() if math.isfinite(v)},
    }
    losses = [loss for _, loss in result.losses]
    return {
        "metrics": metrics,
        "trainable_params": int(result.lora_params),
        "calibration_seconds": float(result.prepare_seconds),
        "train_seconds": float(result.train_seconds),
        "peak_memory_bytes": None,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "extra": {
            "cell": {**asdict(config), "bounds": [r_min, r_max]},
            "data": data.description,
            "budget_params": budget,
            "planted": planted,
            "oracle": oracle,
            "rank_map": chosen,
            "relative_update_norm": relative,
            "setup_seconds": setup_seconds,
            "eval_seconds": eval_seconds,
            "first_train_loss": losses[0] if losses else None,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "train_examples": min(len(data.train_rows), config.steps * config.batch_size),
            "eval_examples": len(eval_rows),
        },
    }


def _base_names(rank_map: dict[str, int], names: Sequence[str]) -> dict[str, int]:
    """A rank map keyed by PEFT's names -> keyed by the base model's names (0 for a dropped module)."""
    out = {}
    for n in names:
        hits = [k for key, k in rank_map.items() if key == n or key.endswith("." + n)]
        out[n] = int(hits[0]) if len(hits) == 1 else 0
    return out
