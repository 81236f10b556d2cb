import json
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


# -- loaders never mangle valid files, and name the line of a bad one ---------------------------------
def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    # What json.dumps(ensure_ascii=False) writes: U+2028, U+2029 and U+0085 stay raw inside strings.
    rows = [{"id": f"r{i}", "text": f"a{sep}b", "label": "x", "split": "test"}
            for i, sep in enumerate(["\u2028", "\u2029", "\u0085", "\x1c", "\r"])]
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:4]), encoding="utf-8")
    dataset = load(tmp_path)
    assert [i.fields["text"] for i in dataset.items] == [r["text"] for r in rows[:4]]
    assert [i.line for i in dataset.items] == [1, 2, 3, 4]


def test_the_one_jsonl_reader_takes_a_path_or_a_stream_and_bounds_lines(tmp_path):
    import io

    from flywheel.data import read_jsonl
    from flywheel.errors import SpecError

    body = '\ufeff{"t": "a\u2028b\u0085c"}\n\n{"t": 2}\r\n'.encode()
    (tmp_path / "x.jsonl").write_bytes(body)
    expected = [(1, {"t": "a\u2028b\u0085c"}), (3, {"t": 2})]
    assert read_jsonl(tmp_path / "x.jsonl") == expected
    assert read_jsonl(io.BytesIO(body), "upload.jsonl") == expected
    with pytest.raises(SpecError, match=r"^upload\.jsonl:2: line is longer than 64 bytes"):
        read_jsonl(io.BytesIO(b'{"a": 1}\n' + b" " * 100), "upload.jsonl", error=SpecError, max_line_bytes=64)
    with pytest.raises(DataError, match=r"^u\.jsonl:2: not UTF-8 text \(byte 11\)"):
        read_jsonl(io.BytesIO(b'{"a": 1}\n{"\xe9": 1}\n'), "u.jsonl")
    with pytest.raises(DataError, match=r"^u\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(io.BytesIO(b"[1]\n"), "u.jsonl")
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_nul_byte_in_a_csv_is_an_error_naming_the_line(tmp_path):
    with pytest.raises(DataError, match=r"data\.csv:3: NUL byte in a CSV file"):
        _csv(tmp_path, "text,label\na,x\nb\0c,y\n")


def test_jsonl_with_crlf_line_ends(tmp_path):
    rows = make_rows(1)
    (tmp_path / "data.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    assert len(load(tmp_path).items) == 3


def _csv(tmp_path, text, **dataset):
    (tmp_path / "data.csv").write_text(text, encoding="utf-8", newline="")
    return load(tmp_path, dataset={"path": "data.csv", **dataset}, split={"ratios": {"test": 1.0}})


def test_csv_quoted_newlines_and_quotes_are_kept(tmp_path):
    dataset = _csv(tmp_path, 'text,label\n"line one\nline two",x\n"say ""hi""",y\r\n"a,b",z\n')
    assert [i.fields["text"] for i in dataset.items] == ["line one\nline two", 'say "hi"', "a,b"]
    assert [i.line for i in dataset.items] == [2, 4, 5]  # the line each row starts on


@pytest.mark.parametrize("text, message", [
    ('text,label\n"never closed,x\nnext,y\n', r"data\.csv:2: malformed CSV: a quoted field is never closed"),
    ('text,label\n"a"b,x\n', r"data\.csv:2: malformed CSV: ',' expected after '\"'"),
    ("text,label,text\na,b,c\n", r"data\.csv:1: duplicate header column 'text'"),
    ("text,,label\na,b,c\n", r"data\.csv:1: header column 2 has no name"),
    ("text,label\na,b\nc\n", r"data\.csv:3: 1 values but 2 header columns \(fewer"),
    ("text,label\na,b,c\n", r"data\.csv:2: 3 values but 2 header columns \(more"),
    ("", r"data\.csv: dataset is empty|CSV file has no header row"),
])
def test_malformed_csv_is_an_error_naming_the_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        _csv(tmp_path, text)


@pytest.mark.parametrize("value, kind", [(None, "null"), ({"a": 1}, "dict"), ([1], "list"), (1.5, "float"),
                                         (True, "bool")])
def test_ids_must_be_strings_or_integers(tmp_path, value, kind):
    write_jsonl(tmp_path / "data.jsonl", [{"id": "ok", "text": "a", "label": "b", "split": "test"},
                                          {"id": value, "text": "a", "label": "b", "split": "test"}])
    with pytest.raises(DataError, match=rf"data\.jsonl:2: id field 'id' is {kind}; item ids must be strings or integers"):
        load(tmp_path)


def test_integer_ids_are_accepted(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"id": 7, "text": "a", "label": "b", "split": "test"}])
    assert load(tmp_path).items[0].key == "7"


@pytest.mark.parametrize("text, message", [
    ('"x\\ud800"', r"data\.jsonl:2: a string holds a lone surrogate escape"),
    ("[" * 100000 + "]" * 100000, r"data\.jsonl:2: invalid JSON: nested too deeply"),
    ("9" * 5000, r"data\.jsonl:2: invalid JSON: Exceeds the limit \(4300 digits\)"),
])
def test_jsonl_values_python_cannot_hold_are_errors_naming_the_line(tmp_path, text, message):
    good = json.dumps({"id": "a", "text": "t", "label": "l", "split": "test"})
    (tmp_path / "data.jsonl").write_text(good + '\n{"id": "b", "text": ' + text + ', "label": "l", "split": "test"}\n')
    with pytest.raises(DataError, match=message):
        load(tmp_path)
