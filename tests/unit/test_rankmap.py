"""Unit tests for fimlora.rankmap (RankMap, tables, comparisons) and fimlora.plot."""

from __future__ import annotations

import itertools
import json
import math
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fimlora.rankmap import FORMAT, RankMap, RankTable, split_module_name


def _bert_names(n_layers: int = 2) -> list[str]:
    kinds = ["attention.self.query", "attention.self.value", "intermediate.dense"]
    return [f"bert.encoder.layer.{i}.{k}" for i in range(n_layers) for k in kinds]


def _kendall_reference(a: list[int], b: list[int]) -> float:
    """Brute-force tau-b straight from the definition, in pure Python."""
    concordant = discordant = tied_a = tied_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0:
            tied_a += 1
        if db == 0:
            tied_b += 1
        if da * db > 0:
            concordant += 1
        elif da * db < 0:
            discordant += 1
    n0 = len(a) * (len(a) - 1) // 2
    return (concordant - discordant) / math.sqrt((n0 - tied_a) * (n0 - tied_b))


def _spearman_reference(a: list[int], b: list[int]) -> float:
    """Pure-Python Spearman: Pearson on average ranks."""

    def avg_ranks(x: list[int]) -> list[float]:
        return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]

    ra, rb = avg_ranks(a), avg_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb))


# -- construction and validation ----------------------------------------------------------------


def test_mapping_behaviour_and_order() -> None:
    rm = RankMap({"b": 3, "a": 5, "c": 1})
    assert list(rm) == ["b", "a", "c"]
    assert rm["a"] == 5
    assert len(rm) == 3
    assert rm.total_rank == 9
    assert rm == {"a": 5, "b": 3, "c": 1}
    assert rm != {"a": 5, "b": 3, "c": 2}
    assert rm == RankMap({"c": 1, "a": 5, "b": 3}, metadata={"other": True})
    assert hash(rm) == hash(RankMap({"c": 1, "a": 5, "b": 3}))
    assert repr(rm) == "RankMap(n_modules=3, total_rank=9, min=1, max=5)"


def test_numpy_integer_ranks_are_accepted_as_int() -> None:
    rm = RankMap({"m": np.int64(4)})
    assert type(rm["m"]) is int


@pytest.mark.parametrize("bad", [-1, -2, 2.0, "3", True, False, None, np.float32(2)])
def test_invalid_rank_names_the_module(bad: object) -> None:
    with pytest.raises(ValueError, match="layers.7.mlp"):
        RankMap({"ok": 2, "model.layers.7.mlp": bad})  # type: ignore[dict-item]


def test_non_str_module_name_rejected() -> None:
    with pytest.raises(ValueError, match="must be str"):
        RankMap({3: 2})  # type: ignore[dict-item]


def test_metadata_is_copied_and_immutable_from_outside() -> None:
    meta = {"scores": {"a": 0.5}, "budget": 8}
    rm = RankMap({"a": 8}, metadata=meta)
    meta["budget"] = 99
    view = rm.metadata
    view["scores"]["a"] = -1.0
    assert rm.metadata == {"scores": {"a": 0.5}, "budget": 8}


def test_metadata_must_be_json_serialisable() -> None:
    with pytest.raises(ValueError, match="JSON"):
        RankMap({"a": 1}, metadata={"obj": object()})


def test_metadata_numpy_values_become_plain() -> None:
    rm = RankMap({"a": 1}, metadata={"s": np.float32(0.25), "v": np.arange(3)})
    assert rm.metadata == {"s": 0.25, "v": [0, 1, 2]}


def test_parameter_count() -> None:
    rm = RankMap({"q": 4, "v": 2})
    assert rm.parameter_count({"q": (10, 20), "v": (5, 5), "extra": (1, 1)}) == 4 * 30 + 2 * 10
    with pytest.raises(ValueError, match="'v'"):
        rm.parameter_count({"q": (10, 20)})


# -- serialisation ------------------------------------------------------------------------------


def test_json_round_trip_with_metadata(tmp_path: pathlib.Path) -> None:
    meta = {"budget": {"ranks": 12}, "scores": {"x.0.q": 1.5, "x.0.v": 0.25}, "seed": 0}
    rm = RankMap({"x.0.v": 4, "x.0.q": 8}, metadata=meta)
    path = rm.save_json(tmp_path / "sub" / "ranks.json")
    assert path == tmp_path / "sub" / "ranks.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == FORMAT
    assert on_disk["ranks"] == {"x.0.v": 4, "x.0.q": 8}
    loaded = RankMap.load_json(path)
    assert loaded == rm
    assert list(loaded) == ["x.0.v", "x.0.q"]
    assert loaded.metadata == meta
    assert RankMap.from_dict(rm.to_dict()).metadata == meta


def test_atomic_save_leaves_no_temp_files(tmp_path: pathlib.Path) -> None:
    RankMap({"a": 1}).save_json(tmp_path / "r.json")
    RankMap({"a": 2}).save_json(tmp_path / "r.json")  # overwrite goes through os.replace too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert RankMap.load_json(tmp_path / "r.json")["a"] == 2


def test_failed_save_cleans_up_and_keeps_old_file(tmp_path: pathlib.Path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    RankMap({"a": 1}).save_json(target)

    def boom(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fimlora.rankmap.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        RankMap({"a": 2}).save_json(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert RankMap.load_json(target)["a"] == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"ranks": {"a": 1}}, "no 'format' field"),
        ({"format": "fimlora.rankmap/0", "ranks": {"a": 1}}, "fimlora.rankmap/0"),
        ({"format": FORMAT, "ranks": [1, 2]}, "'ranks' must be a mapping"),
        ({"format": FORMAT, "ranks": {"a": -1}}, "'a'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_load_json_bad_document_names_path(tmp_path: pathlib.Path, payload: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as info:
        RankMap.load_json(path)
    assert str(path) in str(info.value)


def test_load_json_invalid_json_names_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        RankMap.load_json(path)
    assert str(path) in str(info.value)


# -- names and tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
        ("model.layers.11.mlp.down_proj", (11, "mlp.down_proj")),
        ("transformer.h.0.attn.c_attn", (0, "attn.c_attn")),
        ("base_model.model.model.layers.2.self_attn.q_proj", (2, "self_attn.q_proj")),
        ("model.layers.3.experts.7.w1", (7, "w1")),
        ("lm_head", (None, "lm_head")),
        ("model.layers.5", (None, "model.layers.5")),  # trailing index: not "inside" a layer
        ("a.²3.b", (None, "a.²3.b")),  # only ASCII digits count
    ],
)
def test_split_module_name(name: str, expected: tuple[int | None, str]) -> None:
    assert split_module_name(name) == expected


def test_table_bert_layout() -> None:
    names = _bert_names(2)
    rm = RankMap({n: i + 1 for i, n in enumerate(names)})
    t = rm.table()
    assert t.layers == [0, 1]
    assert t.kinds == ["attention.self.query", "attention.self.value", "intermediate.dense"]
    assert t.values == [[1, 2, 3], [4, 5, 6]]
    assert t.modules[1][2] == "bert.encoder.layer.1.intermediate.dense"


def test_table_llama_sorts_layers_numerically_and_puts_none_last() -> None:
    rm = RankMap(
        {
            "lm_head": 2,
            "model.layers.10.self_attn.q_proj": 8,
            "model.layers.2.self_attn.q_proj": 4,
            "model.layers.2.mlp.down_proj": 6,
        }
    )
    t = rm.table()
    assert t.layers == [2, 10, None]
    assert t.kinds == ["lm_head", "self_attn.q_proj", "mlp.down_proj"]  # first-seen order
    assert t.values == [[None, 4, 6], [None, 8, None], [2, None, None]]


def test_table_gpt2_names() -> None:
    rm = RankMap({"transformer.h.0.attn.c_attn": 3, "transformer.h.1.attn.c_attn": 5})
    assert rm.table() == RankTable(
        layers=[0, 1],
        kinds=["attn.c_attn"],
        values=[[3], [5]],
        modules=[["transformer.h.0.attn.c_attn"], ["transformer.h.1.attn.c_attn"]],
    )


def test_table_encoder_decoder_kinds_do_not_collide() -> None:
    rm = RankMap(
        {
            "model.encoder.layers.0.self_attn.q_proj": 2,
            "model.decoder.layers.0.self_attn.q_proj": 7,
            "model.decoder.layers.0.encoder_attn.q_proj": 3,
        }
    )
    t = rm.table()
    assert t.kinds == ["encoder.self_attn.q_proj", "decoder.self_attn.q_proj", "encoder_attn.q_proj"]
    assert t.values == [[2, 7, 3]]


def test_markdown_totals() -> None:
    rm = RankMap(
        {
            "model.layers.0.q": 4,
            "model.layers.0.v": 2,
            "model.layers.1.q": 8,
            "lm_head": 1,
        }
    )
    lines = rm.format_table().splitlines()
    assert lines[0] == "| layer | q | v | lm_head | total |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| 0 | 4 | 2 |  | 6 |"
    assert lines[3] == "| 1 | 8 |  |  | 8 |"
    assert lines[4] == "| - |  |  | 1 | 1 |"
    assert lines[5] == "| total | 12 | 2 | 1 | 15 |"
    assert len(lines) == 6
    assert rm.format_table() == rm.table().to_markdown()


# -- comparison ---------------------------------------------------------------------------------


def test_compare_identical() -> None:
    rm = RankMap({n: (i % 4) + 1 for i, n in enumerate(_bert_names(3))})
    c = rm.compare(dict(rm))
    assert c.spearman == pytest.approx(1.0)
    assert c.kendall == pytest.approx(1.0)
    assert c.l1 == 0
    assert c.l1_normalised == 0.0
    assert c.n_common == len(rm)
    assert c.only_in_self == [] and c.only_in_other == []


def test_compare_reversed() -> None:
    a = RankMap({f"m{i}": i + 1 for i in range(6)})
    b = {f"m{i}": 6 - i for i in range(6)}
    c = a.compare(b)
    assert c.spearman == pytest.approx(-1.0)
    assert c.kendall == pytest.approx(-1.0)
    assert c.l1 == sum(abs((i + 1) - (6 - i)) for i in range(6))
    assert c.l1_normalised == pytest.approx(c.l1 / a.total_rank)


def test_compare_tau_b_with_ties_hand_computed() -> None:
    # a = [1,1,2,3], b = [1,2,2,3]: of the 6 pairs, 4 concordant, 0 discordant,
    # 1 tied in a only, 1 tied in b only -> tau_b = 4 / sqrt(5 * 5) = 0.8.
    a = RankMap({"w": 1, "x": 1, "y": 2, "z": 3})
    b = {"w": 1, "x": 2, "y": 2, "z": 3}
    c = a.compare(b)
    assert c.kendall == pytest.approx(0.8)
    assert c.kendall == pytest.approx(_kendall_reference([1, 1, 2, 3], [1, 2, 2, 3]))
    # Average ranks [1.5,1.5,3,4] and [1,2.5,2.5,4], centred on 2.5: [-1,-1,.5,1.5] and
    # [-1.5,0,0,1.5]; covariance sum 3.75, squared sums 4.5 each -> rho = 3.75 / 4.5 = 5/6.
    assert c.spearman == pytest.approx(5 / 6)


def test_compare_matches_reference_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    a = [int(v) for v in rng.integers(1, 5, size=40)]
    b = [int(v) for v in rng.integers(1, 5, size=40)]
    c = RankMap({f"m{i}": v for i, v in enumerate(a)}).compare({f"m{i}": v for i, v in enumerate(b)})
    assert c.kendall == pytest.approx(_kendall_reference(a, b), abs=1e-12)
    assert c.spearman == pytest.approx(_spearman_reference(a, b), abs=1e-12)


def test_compare_kendall_across_block_boundary(monkeypatch) -> None:
    # Force several row blocks so the blocked accumulation is exercised on a small input.
    monkeypatch.setattr("fimlora.rankmap._KENDALL_BLOCK", 7)
    rng = np.random.default_rng(1)
    a = [int(v) for v in rng.integers(1, 6, size=30)]
    b = [int(v) for v in rng.integers(1, 6, size=30)]
    c = RankMap({f"m{i}": v for i, v in enumerate(a)}).compare({f"m{i}": v for i, v in enumerate(b)})
    assert c.kendall == pytest.approx(_kendall_reference(a, b), abs=1e-12)


def test_compare_partial_overlap_and_constant_side() -> None:
    a = RankMap({"p": 4, "q": 4, "r": 4, "s": 2})
    c = a.compare({"q": 1, "r": 3, "t": 2, "p": 2})
    assert c.n_common == 3
    assert c.only_in_self == ["s"]
    assert c.only_in_other == ["t"]
    assert c.l1 == 3 + 1 + 2
    assert c.l1_normalised == pytest.approx(6 / 14)
    assert math.isnan(c.spearman)  # a is constant (4, 4, 4) on the common modules
    assert math.isnan(c.kendall)


def test_compare_fewer_than_two_common_is_nan() -> None:
    c = RankMap({"a": 1, "b": 2}).compare({"a": 3})
    assert c.n_common == 1
    assert math.isnan(c.spearman) and math.isnan(c.kendall)


def test_compare_rejects_non_int_other() -> None:
    with pytest.raises(ValueError, match="'a'"):
        RankMap({"a": 1}).compare({"a": 1.5})  # type: ignore[dict-item]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=2, max_size=30))
def test_correlations_bounded_and_symmetric(pairs: list[tuple[int, int]]) -> None:
    a = RankMap({f"m{i}": x for i, (x, _) in enumerate(pairs)})
    b = RankMap({f"m{i}": y for i, (_, y) in enumerate(pairs)})
    ab, ba = a.compare(b), b.compare(a)
    for value, mirrored in ((ab.spearman, ba.spearman), (ab.kendall, ba.kendall)):
        if math.isnan(value):
            assert math.isnan(mirrored)
        else:
            assert -1.0 <= value <= 1.0
            assert value == pytest.approx(mirrored, abs=1e-12)
    if not math.isnan(ab.kendall):
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        assert ab.kendall == pytest.approx(_kendall_reference(xs, ys), abs=1e-12)
    assert ab.l1 == ba.l1


# -- figures ------------------------------------------------------------------------------------


def _is_png(path: pathlib.Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_heatmap_writes_png(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    names = [f"model.layers.{i}.{k}" for i in range(40) for k in ["q", "k", "v", "o", "up", "down"]]
    rm = RankMap({n: (i * 7) % 16 + 1 for i, n in enumerate(names)} | {"lm_head": 3})
    out = rm.plot_heatmap(tmp_path / "figs" / "heat.png", title="ranks")
    assert out == tmp_path / "figs" / "heat.png"
    assert _is_png(out)
    scores = {n: float(r) / 3 for n, r in rm.items() if n != "lm_head"}
    assert _is_png(rm.plot_heatmap(tmp_path / "heat_scores.png", scores=scores))


def test_plot_heatmap_marks_the_dropped_modules(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    from fimlora.plot import rank_heatmap_figure

    names = [f"model.layers.{i}.{k}" for i in range(3) for k in ["q", "v"]]
    rm = RankMap({n: (0 if i < 4 else 3 + i) for i, n in enumerate(names)})
    assert _is_png(rm.plot_heatmap(tmp_path / "dropped.png"))
    ax = rank_heatmap_figure(rm).axes[0]
    assert ax.get_title() == "rank (total 15, 6 modules, 4 dropped (rank 0, hatched))"
    hatched = [p for p in ax.patches if p.get_hatch()]
    # One hatched square per dropped module, centred on its (layer, kind) cell: rows 0-1, both kinds.
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Dropped cells are outside the colour scale: it spans the kept ranks only (7 and 8).
    image = ax.images[0]
    assert (image.norm.vmin, image.norm.vmax) == (7.0, 8.0)
    assert int(image.get_array().mask.sum()) == 4
    plain = rank_heatmap_figure(RankMap({n: 1 for n in names})).axes[0]
    assert plain.get_title() == "rank (total 6, 6 modules)"
    assert not [p for p in plain.patches if p.get_hatch()]


def test_plot_bars_and_curves_write_png(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    from fimlora.plot import plot_rank_bars, plot_training_curves

    rm = RankMap({n: i + 1 for i, n in enumerate(_bert_names(3))})
    uniform = {n: 4 for n in list(rm)[:-1]}  # a reference missing one module is fine
    assert _is_png(plot_rank_bars(rm, tmp_path / "bars.png", reference=uniform, title="t"))
    assert _is_png(plot_rank_bars(rm, tmp_path / "bars_plain.png"))
    curves = {"fim": [(0, 2.0), (10, 1.5), (20, 1.2)], "uniform": [(20, 1.3), (0, 2.0), (10, 1.6)]}
    assert _is_png(plot_training_curves(curves, tmp_path / "c" / "loss.png", title="loss"))
    with pytest.raises(ValueError, match="no curves"):
        plot_training_curves({}, tmp_path / "empty.png")


def test_plot_empty_map_rejected(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="empty"):
        RankMap({}).plot_heatmap(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_rankmap_module_imports_no_heavy_frameworks() -> None:
    # Load rankmap.py on its own (not via fimlora/__init__, which may import torch by design) in a
    # fresh interpreter, and check it pulled in none of the heavy frameworks.
    import subprocess
    import sys

    import fimlora.rankmap

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('rm', {fimlora.rankmap.__file__!r}); "
        "mod = importlib.util.module_from_spec(spec); sys.modules['rm'] = mod; "
        "spec.loader.exec_module(mod); "
        "assert mod.RankMap({'a': 1}).total_rank == 1; "
        "print(','.join(m for m in ('torch', 'peft', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
