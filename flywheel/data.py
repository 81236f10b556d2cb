"""Datasets: JSONL or CSV rows, content-hashed, split deterministically.

Each row becomes an `Item` with a stable key (the `id_field`, or the 1-based row number), its
fields, and its split. Splits come from a column, or from a seeded hash of the item key, so adding
rows never moves an existing item between splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from flywheel.capture_rows import capture_fields, parse_when
from flywheel.errors import DataError, FlywheelError
from flywheel.images import ImageAccess
from flywheel.spec import SPLITS, EvalSpec
from flywheel.store import Store

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
    # What the item's image parts may read (the spec's dataset.images); None: the source's folder only.
    image_access: ImageAccess | None = field(default=None, compare=False)
    # The proxy capture the item was made from (a `dataset.captures` eval): lineage for deletion.
    capture_id: int | None = field(default=None, compare=False)

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


# A JSONL line may hold a vision row: 10 images of 10 MB as base64 data URLs, plus its text.
MAX_JSONL_LINE_BYTES = 150 * 1024 * 1024


def read_jsonl(source: str | Path | BinaryIO, name: str | None = None, *,
               error: type[FlywheelError] = DataError,
               max_line_bytes: int = MAX_JSONL_LINE_BYTES) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file or binary stream: the one
    JSONL reader of every door (datasets, uploads, importers, training files).

    Lines end at b"\n" only: U+2028, U+2029 and U+0085 are valid inside JSON strings (what
    json.dumps(ensure_ascii=False) writes), so str.splitlines would cut rows in half. Each line
    is read with a bound (`max_line_bytes`), so a file with no newline cannot fill memory. Any
    problem raises `error` as `NAME:LINE: what` (NAME is the path, or `name`).

        rows = read_jsonl("items.jsonl")                    # [(1, {...}), (3, {...})]
        rows = read_jsonl(request_stream, "upload.jsonl", error=SpecError)
    """
    if isinstance(source, (str, Path)):
        label = name or str(source)
        try:
            with open(source, "rb") as stream:
                return read_jsonl(stream, label, error=error, max_line_bytes=max_line_bytes)
        except FileNotFoundError:
            raise error(f"{label}: file not found") from None
        except IsADirectoryError:
            raise error(f"{label}: is a folder, not a JSONL file") from None
        except OSError as exc:
            raise error(f"{label}: cannot read: {exc.strerror or exc}") from None
    label = name or str(getattr(source, "name", "<stream>"))
    rows: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for number in itertools.count(1):
        try:
            raw = source.readline(max_line_bytes + 1)
        except OSError as exc:
            raise error(f"{label}:{number}: cannot read: {exc.strerror or exc}") from None
        if not raw:
            break
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise error(f"{label}:{number}: line is longer than {max_line_bytes} bytes (JSONL rows end at a newline)")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            raw, offset = raw[3:], 3
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{label}:{number}: not UTF-8 text (byte {offset + exc.start})") from None
        offset += len(raw)
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip(" \t"):
            continue
        rows.append((number, _json_object(line, f"{label}:{number}", error)))
    return rows


def _json_object(line: str, where: str, error: type[FlywheelError]) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise error(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise error(f"{where}: invalid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{where}: a string holds a lone surrogate escape (such as \\ud800) "
                        "that is not a character") from None
    return row


def _read_csv(path: Path, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Rows by the csv module's full quoting rules (quoted newlines kept); rows are numbered by the
    line they start on. Duplicate or empty header names, ragged rows, unterminated quotes and NUL
    bytes are errors naming the line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if "\0" in text:  # never text; the csv module would keep it inside a field
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{path}:{line}: NUL byte in a CSV file (is it a binary file?)")
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
    rows = _read_csv(path, raw) if spec.dataset.resolved_format == "csv" else read_jsonl(io.BytesIO(raw), str(path))
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
    access = spec.image_access(path.parent)
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
        items.append(Item(key=key, fields=fields, split=split, line=number, source=path, image_access=access))

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
    if path.suffix.lower() == ".csv":
        try:
            rows = _read_csv(path, path.read_bytes())
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    else:
        rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def captures_dataset(spec: EvalSpec) -> Dataset:
    """The proxy's successful captures matching `spec.dataset.captures`, as a Dataset (all in test)."""
    source = spec.dataset.captures
    path = spec.dataset_path
    if not path.exists():
        raise DataError(f"{spec.source}: dataset.captures.db: no store at {path}")
    store = Store.open(path)
    try:
        rows = store.query_captures(
            metadata=source.metadata, since=parse_when(source.since, option="dataset.captures.since"),
            until=parse_when(source.until, end=True, option="dataset.captures.until"), model=source.model,
            outcome="ok")
    finally:
        store.close()
    items, digest = [], hashlib.sha256()
    access = spec.image_access(None)  # captures hold data URLs (or URLs, fetched only if the spec says so)
    for line, row in enumerate(rows, start=1):
        fields = capture_fields(row)
        if fields is None:
            continue
        items.append(Item(key=str(row.id), fields=fields, split="test", line=line, image_access=access,
                          capture_id=row.id))
        digest.update(json.dumps([row.id, fields], sort_keys=True, default=str).encode())
    if not items:
        filters = source.model_dump(exclude_none=True, exclude={"db"})
        raise DataError(f"{spec.source}: dataset.captures: no successful chat captures in {path} match {filters}")
    return Dataset(path=path, content_hash=digest.hexdigest()[:16], items=items)
