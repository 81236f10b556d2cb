from collections import Counter

import pytest
import yaml

from flywheel.data import load_dataset
from flywheel.errors import DataError
from flywheel.spec import load_eval_spec

from conftest import make_rows, spec_dict, write_jsonl


def load(tmp_path, **overrides):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec_dict("local:smollm2", **overrides)))
    return load_dataset(load_eval_spec(path))


def test_split_column_and_ids(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", make_rows(4))
    dataset = load(tmp_path)
    assert Counter(i.split for i in dataset.items) == {"train": 4, "valid": 4, "test": 4}
    assert dataset.split("test")[0].key == "test-0"
    assert len(dataset.content_hash) == 16


def test_seeded_ratio_split_is_stable(tmp_path):
    rows = [{"text": f"q{i}", "label": "a"} for i in range(300)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    kw = dict(dataset={"path": "data.jsonl"}, split={"seed": 3})
    first = [i.split for i in load(tmp_path, **kw).items]
    assert first == [i.split for i in load(tmp_path, **kw).items]
    counts = Counter(first)
    assert 140 < counts["train"] < 220 and counts["valid"] > 30 and counts["test"] > 30
    # Appending rows never moves an existing item between splits.
    write_jsonl(tmp_path / "data.jsonl", rows + [{"text": "new", "label": "a"}])
    assert [i.split for i in load(tmp_path, **kw).items][:300] == first


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.path: file not found: .*data\.jsonl"):
        load(tmp_path)


def test_broken_jsonl_line_number(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "x", "split": "test", "id": "1"}\n'
                                         '{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON"):
        load(tmp_path)


def test_csv_without_mapped_column(tmp_path):
    (tmp_path / "data.csv").write_text("text,category\nhello,card_arrival\n")
    with pytest.raises(DataError, match=r"data\.csv: column 'label' \(mapped in dataset.columns\) not found"):
        load(tmp_path, dataset={"path": "data.csv", "columns": {"text": "text", "label": "label"}})


def test_csv_with_mapping(tmp_path):
    (tmp_path / "data.csv").write_text("text,category\nhello,card_arrival\nbye,pin_blocked\n")
    dataset = load(tmp_path, dataset={"path": "data.csv", "columns": {"text": "text", "label": "category"}},
                   split={"ratios": {"test": 1.0}})
    assert [i.fields for i in dataset.items] == [{"text": "hello", "label": "card_arrival"},
                                                 {"text": "bye", "label": "pin_blocked"}]
    assert [i.line for i in dataset.items] == [2, 3]


def test_template_naming_missing_field(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", make_rows(1))
    with pytest.raises(DataError, match=r"input\[1\]\.content: template names item\.question, but data\.jsonl "
                                        r"has no field 'question'"):
        load(tmp_path, input=[{"role": "system", "content": "x"}, {"role": "user", "content": "{{ item.question }}"}])


def test_bad_split_value_names_line(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"id": "1", "text": "a", "label": "b", "split": "dev"}])
    with pytest.raises(DataError, match=r"data\.jsonl:1: split column 'split' is 'dev'"):
        load(tmp_path)


def test_duplicate_ids(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"id": "1", "text": "a", "label": "b", "split": "test"}] * 2)
    with pytest.raises(DataError, match=r"data\.jsonl:2: duplicate item id '1'"):
        load(tmp_path)


def test_demo_dataset_is_stratified():
    dataset = load_dataset(load_eval_spec("evals/banking77/eval.yaml"))
    counts = Counter((i.split, i.fields["label"]) for i in dataset.items)
    labels = {label for _, label in counts}
    assert len(labels) == 10
    for label in labels:
        assert (counts[("train", label)], counts[("valid", label)], counts[("test", label)]) == (40, 10, 20)
    train_texts = {i.fields["text"] for i in dataset.items if i.split != "test"}
    assert not train_texts & {i.fields["text"] for i in dataset.split("test")}
