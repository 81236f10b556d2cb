"""Datasets: JSONL or CSV rows, content-hashed, split deterministically.

Each row becomes an `Item` with a stable key (the `id_field`, or the 1-based row number), its
fields, and its split. Splits come from a column, or from a seeded hash of the item key, so adding
rows never moves an existing item between splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import DataError
from flywheel.spec import SPLITS, EvalSpec

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_TEMPLATE_VAR = re.compile(r"\{\{\s*item\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Item:
    key: str
    fields: dict[str, Any]
    split: str
    line: int
    # The dataset file: image paths in the item resolve against its folder (flywheel.images).
    source: Path | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """`file:line (item KEY)` for error lines."""
        return f"{self.source.name if self.source else 'item'}:{self.line} (item {self.key!r})"


@dataclass
class Dataset:
    path: Path
    content_hash: str
    items: list[Item] = field(default_factory=list)

    def split(self, name: str | None) -> list[Item]:
        if name in (None, "all"):
            return list(self.items)
        return [item for item in self.items if item.split == name]

    @property
    def fields(self) -> list[str]:
        seen: dict[str, None] = {}
        for item in self.items:
            seen.update(dict.fromkeys(item.fields))
        return list(seen)


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    # Lines end at "\n" only: U+2028, U+2029 and U+0085 are valid inside JSON strings (what
    # json.dumps(ensure_ascii=False) writes), so str.splitlines would cut rows in half.
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip(" \t"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: invalid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
            raise DataError(f"{path}:{number}: invalid JSON: {str(exc).split(';')[0]}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        if _SURROGATE_ESCAPE.search(line):
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{number}: a string holds a lone surrogate escape (such as \\ud800) "
                                "that is not a character") from None
        rows.append((number, row))
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows by the csv module's full quoting rules (quoted newlines kept); rows are numbered by the
    line they start on. Duplicate or empty header names, ragged rows and unterminated quotes are
    errors naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for values in reader:
            line, start = start, reader.line_num + 1
            if not values or values == [""] and header is not None:
                continue  # a blank line
            if header is None:
                header = values
                seen: set[str] = set()
                for position, name in enumerate(header, start=1):
                    if not name.strip():
                        raise DataError(f"{path}:{line}: header column {position} has no name")
                    if name in seen:
                        raise DataError(f"{path}:{line}: duplicate header column {name!r}")
                    seen.add(name)
                continue
            if len(values) != len(header):
                more = "more" if len(values) > len(header) else "fewer"
                raise DataError(f"{path}:{line}: {len(values)} values but {len(header)} header columns "
                                f"({more} values than columns)")
            rows.append((line, dict(zip(header, values))))
    except csv.Error as exc:
        problem = str(exc)
        if "unexpected end of data" in problem or "EOF" in problem:
            problem = "a quoted field is never closed (unterminated quote)"
        raise DataError(f"{path}:{start}: malformed CSV: {problem}") from None
    if header is None:
        raise DataError(f"{path}: CSV file has no header row")
    return rows


def _seeded_split(key: str, seed: int, ratios: dict[str, float]) -> str:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += ratios.get(name, 0.0)
        if point < cumulative:
            return name
    return SPLITS[-1]


# How many times this process parsed each dataset file (by path): a measure, read by tests and
# benchmarks to hold "one load per run" (a wheel run loads its dataset once and passes it down).
PARSES: Counter[str] = Counter()


def load_dataset(spec: EvalSpec) -> Dataset:
    """Read, map, split and hash the spec's dataset; DataError names file, line or column."""
    if spec.dataset.captures is not None:  # items from the proxy's captures, not a file
        from flywheel.outputs import captures_dataset

        dataset = captures_dataset(spec)
        check_templates(spec, dataset)
        return dataset
    path = spec.dataset_path
    PARSES[str(path)] += 1
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{spec.source}: dataset.path: file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None

    rows = _read_csv(path, text) if spec.dataset.resolved_format == "csv" else _read_jsonl(path, text)
    if not rows:
        raise DataError(f"{path}: dataset is empty")

    columns = spec.dataset.columns
    if columns:
        present = set().union(*(row.keys() for _, row in rows))
        missing = [source for source in columns.values() if source not in present]
        if missing:
            kind = "column" if spec.dataset.resolved_format == "csv" else "field"
            raise DataError(
                f"{path}: {kind} {missing[0]!r} (mapped in dataset.columns) not found; "
                f"available: {', '.join(sorted(present))}"
            )

    items: list[Item] = []
    seen: set[str] = set()
    split_spec = spec.split
    for number, row in rows:
        fields = {name: row.get(source) for name, source in columns.items()} if columns else row
        if spec.dataset.id_field:
            if spec.dataset.id_field not in row:
                raise DataError(f"{path}:{number}: id field {spec.dataset.id_field!r} missing")
            raw_key = row[spec.dataset.id_field]
            if isinstance(raw_key, bool) or not isinstance(raw_key, (str, int)):
                kind = "null" if raw_key is None else type(raw_key).__name__
                raise DataError(f"{path}:{number}: id field {spec.dataset.id_field!r} is {kind}; "
                                "item ids must be strings or integers")
            key = str(raw_key)
        else:
            key = str(number)
        if key in seen:
            raise DataError(f"{path}:{number}: duplicate item id {key!r}")
        seen.add(key)
        if split_spec.column:
            split = row.get(split_spec.column)
            if split not in SPLITS:
                raise DataError(
                    f"{path}:{number}: split column {split_spec.column!r} is {split!r}; "
                    f"expected one of {', '.join(SPLITS)}"
                )
        else:
            split = _seeded_split(key, split_spec.seed, split_spec.ratios)
        items.append(Item(key=key, fields=fields, split=split, line=number, source=path))

    dataset = Dataset(path=path, content_hash=hashlib.sha256(raw).hexdigest()[:16], items=items)
    check_templates(spec, dataset)
    return dataset


def check_templates(spec: EvalSpec, dataset: Dataset) -> None:
    """Fail fast when an input message names an item field that no row has."""
    available = set(dataset.fields)
    for index, message in enumerate(spec.input):
        for where, text in message.templates():
            for name in _TEMPLATE_VAR.findall(text):
                if name not in available:
                    raise DataError(
                        f"{spec.source}: input[{index}].{where}: template names item.{name}, but "
                        f"{dataset.path.name} has no field {name!r}; fields: {', '.join(sorted(available))}"
                    )


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL or CSV file (by suffix), outside any eval spec."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = _read_csv(path, text) if path.suffix.lower() == ".csv" else _read_jsonl(path, text)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
