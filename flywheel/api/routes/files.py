"""Files: upload (multipart, purpose `fine-tune` or `evals`), list, retrieve, content, delete.

Uploads are checked line by line before anything is stored: a fine-tune file must be in one of
the platform's training formats (`flywheel.train.formats.validate_rows`: SFT chat, DPO
preference or RFT prompts), an evals file must hold `{"item": {...}}` objects. The first bad
line is a 400 naming the file and the line. The bytes live under `.flywheel/api/files/`, the row
in `api_files`.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.api.access import caller
from flywheel.api.errors import invalid, not_found
from flywheel.api.jobs import new_object_id
from flywheel.api.pagination import page, page_args
from flywheel.api.scoped import get_owned, insert_owned, list_owned
from flywheel.store import Store, now, unix_seconds
from flywheel.web import size_limited

if TYPE_CHECKING:
    from flywheel.api.state import ApiState

PURPOSES = ("fine-tune", "evals")


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A stored file as the platform shows it."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": unix_seconds(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def parse_jsonl(data: bytes | BinaryIO, filename: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL upload (bytes, or a binary stream such as a spooled file),
    read by flywheel.data.read_jsonl; a 400 naming the first bad line."""
    from flywheel.data import read_jsonl
    from flywheel.errors import DataError

    try:
        rows = [row for _, row in read_jsonl(io.BytesIO(data) if isinstance(data, bytes) else data, filename)]
    except DataError as exc:
        raise invalid(f"{exc}.", "file", "invalid_file_format") from None
    if not rows:
        raise invalid(f"{filename}: the file has no JSONL rows.", "file", "invalid_file_format")
    return rows


def training_kind(rows: list[dict[str, Any]]) -> str:
    """The platform training format of a fine-tune file, read off its first row."""
    first = rows[0]
    if "preferred_output" in first or "input" in first:
        return "dpo"
    messages = first.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        return "sft"
    return "rft"


def validate_upload(purpose: str, rows: list[dict[str, Any]], filename: str) -> None:
    """Check rows against the purpose's format; a 400 naming the line."""
    if purpose == "fine-tune":
        from flywheel.train.formats import TrainingDataError, validate_rows

        try:
            validate_rows(training_kind(rows), rows, filename)
        except TrainingDataError as exc:
            raise invalid(f"Invalid file format: {exc}.", "file", "invalid_file_format") from None
        return
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("item"), dict):
            raise invalid(f"{filename}:{number}: an evals file line must be {{\"item\": {{...}}}} "
                          "(optionally with \"sample\").", "file", "invalid_file_format")


def store_file(store: Store, data: bytes | BinaryIO, filename: str, purpose: str, project: str) -> dict[str, Any]:
    """Check an upload (bytes, or a binary stream such as the spooled file of a multipart part; a
    400 naming the line), then keep its bytes and row for `project`. Blocking: the API calls it in
    a thread, so a large file does not hold up other clients."""
    rows = parse_jsonl(data, filename)
    validate_upload(purpose, rows, filename)
    file_id = new_object_id("file-")
    folder = store.artefact_dir / "api" / "files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        data.seek(0)
        with path.open("wb") as out:
            shutil.copyfileobj(data, out, 1 << 20)
    row = {"id": file_id, "created_at": now(), "filename": filename, "purpose": purpose,
           "bytes": path.stat().st_size, "path": str(path), "n_rows": len(rows)}
    return insert_owned(store, "api_files", row, project)


def read_rows(state: "ApiState", file_id: str, param: str, project: str) -> list[dict[str, Any]]:
    """The JSONL rows of a file of `project` (for eval runs and fine-tuning jobs); 404 naming `param`."""
    return read_file_rows(state.store(), file_id, param, project)


def read_file_rows(store: Store, file_id: str, param: str, project: str) -> list[dict[str, Any]]:
    """`read_rows` on a store."""
    row = get_owned(store, "api_files", file_id, project)
    if row is None:
        raise not_found("file", file_id, param)
    return parse_jsonl(Path(row["path"]).read_bytes(), row["filename"])


def routes(state: "ApiState") -> list[Route]:
    async def upload(request: Request) -> Response:
        # the file part streams to a spooled temporary file (disk past 1 MB), refused past the limit
        form = await size_limited(request, state.max_upload_bytes).form()
        try:
            return await _store_upload(request, form)
        finally:
            await form.close()

    async def _store_upload(request: Request, form: Any) -> Response:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose not in PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}.", "purpose")
        if upload is None or isinstance(upload, str):
            raise invalid("Missing required parameter: 'file' (a multipart file part).", "file")
        project = caller(request).project
        # parsed and checked off the event loop: a 47 MB file must not stall every other client
        row = await anyio.to_thread.run_sync(
            lambda: store_file(state.store(), upload.file, upload.filename or "upload.jsonl", purpose, project))
        return JSONResponse(file_object(row))

    async def list_files(request: Request) -> Response:
        after, limit, order = page_args(request, max_limit=10000)
        purpose = request.query_params.get("purpose")
        rows, more = list_owned(state.store(), "api_files", caller(request).project, after=after, limit=limit,
                                order=order, where={"purpose": purpose} if purpose else None)
        return JSONResponse(page([file_object(r) for r in rows], more))

    def _get(request: Request) -> dict[str, Any]:
        file_id = request.path_params["file_id"]
        row = get_owned(state.store(), "api_files", file_id, caller(request).project)
        if row is None:
            raise not_found("file", file_id, "file_id")
        return row

    async def retrieve(request: Request) -> Response:
        return JSONResponse(file_object(_get(request)))

    async def content(request: Request) -> Response:
        row = _get(request)
        return Response(Path(row["path"]).read_bytes(), media_type="application/octet-stream")

    async def delete(request: Request) -> Response:
        row = _get(request)
        state.store().api_delete("api_files", row["id"])
        Path(row["path"]).unlink(missing_ok=True)
        return JSONResponse({"id": row["id"], "object": "file", "deleted": True})

    return [Route("/v1/files", upload, methods=["POST"]), Route("/v1/files", list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", retrieve, methods=["GET"]),
            Route("/v1/files/{file_id}", delete, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", content, methods=["GET"])]
