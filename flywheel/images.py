"""Images in chat messages: loading, format and size checks, content hashes, data URLs, thumbnails.

An eval spec's message may hold content parts in the platform's shape
(`{type: input_text, text}`, `{type: input_image, image_url, detail}`); the prompt renders each
image reference (a file path relative to the dataset, a `data:` URL, an http(s) URL or a
`file://` URL) into a checked image and sends it in the Chat Completions shape every backend
reads, with the bytes inlined as a base64 data URL:

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": "low"}}

The platform's limits are enforced here: JPEG, PNG or WEBP (by magic bytes, then decoded with
Pillow, so a truncated file is refused), at most 10 MB per image and 10 images per example.

What a reference may reach is an `ImageAccess`: regular files inside the dataset's folder (or a
folder the spec allows), never a device, a pipe or a symlink out of it; sizes checked by `stat`
before reading and reads capped; images over Pillow's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`) refused; http(s) URLs fetched only when the spec opts in
(`dataset.images.fetch`). Without an access, only `data:` URLs are read.

    image = load_image("images/cat.png", ImageAccess(root=Path("evals/pets")))
    image.sha256, image.media_type, image.data_url[:22]
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import os
import stat as stat_module
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # the platform's limit per image
MAX_IMAGES = 10  # per example (a conversation, or one training row)
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
DETAILS = ("auto", "low", "high")
FETCH_TIMEOUT_S = 30.0


class ImageError(FlywheelError):
    """An image cannot be used: unreadable, an unsupported format, corrupt, or over a limit.
    `reason` is one of REASONS (the skip reasons training-set screening counts)."""

    def __init__(self, message: str, reason: str = "unreadable_image"):
        super().__init__(message)
        self.reason = reason


REASONS = ("too_many_images", "image_too_large", "unsupported_format", "corrupt_image", "unreadable_image")


@dataclass(frozen=True)
class ImageAccess:
    """What image references may reach. Relative paths resolve against `root` (the dataset
    file's folder); a path, `file://` URL or symlink may only end at a regular file under `root`
    or one of `folders`; http(s) URLs are fetched only when `fetch` is on. The default reaches no
    file and no URL: `data:` URLs only."""

    root: Path | None = None
    folders: tuple[Path, ...] = ()
    fetch: bool = False

    @property
    def allowed(self) -> tuple[Path, ...]:
        """The folders (resolved) that image files may lie under."""
        return tuple(Path(os.path.realpath(f)) for f in ((self.root,) if self.root else ()) + self.folders)


@dataclass(frozen=True)
class LoadedImage:
    """A checked image: its bytes, media type, pixel size and content hash."""

    data: bytes
    media_type: str
    width: int
    height: int
    sha256: str

    @property
    def data_url(self) -> str:
        return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    def pil(self):
        """The image as a Pillow RGB image (what processors of vision models take)."""
        with open_image(self.data) as img:
            return img.convert("RGB")


# -- checking bytes --------------------------------------------------------------------------------
def sniff_format(data: bytes) -> str | None:
    """The format the magic bytes announce (JPEG, PNG, WEBP, GIF, BMP, TIFF), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


@contextlib.contextmanager
def open_image(data: bytes):
    """The bytes opened with Pillow (header only, pixels not decoded yet), refusing images over
    Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) with ImageError: a few
    hundred kB of PNG can decode to gigabytes. Pillow only warns below twice the limit; here
    the limit itself is the error."""
    Image = pillow()
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # the warning is made an error below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {str(exc).split(', could be')[0]} "
                         "(PIL.Image.MAX_IMAGE_PIXELS)", reason="image_too_large") from None
    with img:
        if limit and img.width * img.height > limit:
            raise ImageError(f"image refused as a decompression bomb: {img.width}x{img.height} = "
                             f"{img.width * img.height} pixels, over PIL.Image.MAX_IMAGE_PIXELS = {limit}",
                             reason="image_too_large")
        yield img


def check_image_bytes(data: bytes) -> LoadedImage:
    """Check size, format (magic bytes) and that Pillow decodes every pixel; ImageError says why."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image is {_megabytes(len(data))}, over the {_megabytes(MAX_IMAGE_BYTES)} limit",
                         reason="image_too_large")
    kind = sniff_format(data)
    if kind not in MEDIA_TYPES:
        found = f"{kind} image" if kind else "not an image (unknown file signature)"
        raise ImageError(f"{found}; supported formats: JPEG, PNG, WEBP", reason="unsupported_format")
    Image = pillow()
    from PIL import UnidentifiedImageError

    try:
        with open_image(data) as img:
            img.load()  # decodes the pixels: a truncated or corrupt file fails here
            width, height, decoded = img.width, img.height, img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt {kind} image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         reason="corrupt_image") from None
    if decoded != kind:
        raise ImageError(f"file signature says {kind} but Pillow decodes it as {decoded}", reason="corrupt_image")
    return LoadedImage(data=data, media_type=MEDIA_TYPES[kind], width=width, height=height,
                       sha256=hashlib.sha256(data).hexdigest())


def pillow():
    """PIL.Image, or ImageError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("images need Pillow: pip install 'flywheel[vision]'") from None
    return Image


# -- loading references ----------------------------------------------------------------------------
def decode_data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 `data:` URL; ImageError when it is not one."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ImageError("malformed data URL: expected data:<media type>;base64,<data>")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("malformed data URL: the payload is not valid base64") from None
    return head[len("data:"):-len(";base64")], data


class _Memo:
    """Recently loaded files, by (path, size, mtime): rendering an item twice reads it once."""

    def __init__(self, budget: int = 256 * 1024 * 1024):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[tuple[str, int, int], LoadedImage] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
            return found

    def put(self, key, image: LoadedImage) -> None:
        with self.lock:
            self.entries[key] = image
            self.used += len(image.data)
            while self.used > self.budget and len(self.entries) > 1:
                _, old = self.entries.popitem(last=False)
                self.used -= len(old.data)


_MEMO = _Memo()


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == folder or folder in path.parents for folder in folders)


def _read_file(path: Path, access: ImageAccess) -> LoadedImage:
    """A regular file under one of the access's folders (symlinks resolved first), its size
    checked by fstat before reading and the read capped; a device or pipe is refused unread."""
    allowed = access.allowed
    if not allowed:
        raise ImageError("image files are not read here (no dataset folder): use a data: URL")
    real = Path(os.path.realpath(path))
    if not _inside(real, allowed):
        where = " or ".join(str(f) for f in allowed)
        raise ImageError(f"{path} is outside the dataset folder ({where}); image files must lie inside it "
                         "(or in a folder listed in dataset.images.folders)")
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer; O_NOFOLLOW: the resolved
        # path is the file itself, so a symlink swapped in since is refused.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if stat_module.S_ISDIR(info.st_mode):
            raise ImageError(f"{path} is a folder, not an image file")
        if not stat_module.S_ISREG(info.st_mode):
            raise ImageError(f"{path} is not a regular file (a device, pipe or socket); image files must be plain files")
        if info.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"image is {_megabytes(info.st_size)}, over the {_megabytes(MAX_IMAGE_BYTES)} limit",
                             reason="image_too_large")
        key = (str(real), info.st_size, info.st_mtime_ns)
        found = _MEMO.get(key)
        if found is not None:
            return found
        try:
            data = handle.read(MAX_IMAGE_BYTES + 1)  # capped: a file that grew since fstat is still bounded
        except OSError as exc:
            raise ImageError(f"cannot read image {path}: {exc.strerror}") from None
    image = check_image_bytes(data)
    _MEMO.put(key, image)
    return image


def _fetch(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"cannot fetch image: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ImageError(f"cannot fetch image: {getattr(exc, 'reason', exc)}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image is over the {_megabytes(MAX_IMAGE_BYTES)} limit", reason="image_too_large")
    return data


def load_image(ref: Any, access: ImageAccess | None = None) -> LoadedImage:
    """Load and check an image named by a `data:` URL, a path (relative to `access.root`) or a
    `file://` URL inside the access's folders, or an http(s) URL when `access.fetch` is on.
    Without an access only `data:` URLs are read. Raises ImageError without a location: the
    caller knows which item and part it was rendering."""
    access = access or ImageAccess()
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(f"expected an image path, URL or data URL, got {_show(ref)}")
    ref = ref.strip()
    if ref.startswith("data:"):
        media_type, data = decode_data_url(ref)
        image = check_image_bytes(data)
        if media_type and media_type != image.media_type:
            raise ImageError(f"data URL says {media_type} but the bytes are {image.media_type}")
        return image
    if ref.lower().startswith(("http://", "https://")):
        if not access.fetch:
            raise ImageError("http(s) image URLs are not fetched unless the spec sets dataset.images.fetch: true")
        return check_image_bytes(_fetch(ref))
    if ref.lower().startswith("file:"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file URL names another host ({parts.netloc}); only local files inside the dataset folder are read")
        ref = unquote(parts.path)
    path = Path(ref)
    if not path.is_absolute():
        if access.root is None:
            raise ImageError("image files are not read here (no dataset folder): use a data: URL")
        path = access.root / path
    return _read_file(path, access)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def short_ref(ref: Any) -> str:
    """An image reference for an error line: data URLs cut to their head."""
    if isinstance(ref, str) and ref.startswith("data:"):
        return ref.split(",", 1)[0] + ",..."
    text = str(ref)
    return text if len(text) <= 120 else text[:117] + "..."


# -- parts in messages -----------------------------------------------------------------------------
def image_part(image: LoadedImage, detail: str | None = None) -> dict[str, Any]:
    """The Chat Completions part for an image: `{type: image_url, image_url: {url, detail?}}`."""
    inner: dict[str, Any] = {"url": image.data_url}
    if detail is not None:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def image_url_of(part: Any) -> str | None:
    """The URL of an image part in any of the shapes in use (chat `image_url` object, the
    platform's `input_image` with a string `image_url`), else None."""
    if not isinstance(part, dict):
        return None
    if part.get("type") == "image_url":
        inner = part.get("image_url")
        return inner.get("url") if isinstance(inner, dict) else inner if isinstance(inner, str) else None
    if part.get("type") == "input_image":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, dict) else value
    return None


def iter_image_urls(messages: Sequence[dict[str, Any]] | None) -> Iterator[str]:
    """Every image URL in a conversation, in order."""
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                url = image_url_of(part)
                if url is not None:
                    yield url


def has_images(messages: Sequence[dict[str, Any]] | None) -> bool:
    return next(iter_image_urls(messages), None) is not None


def message_text(content: Any) -> str:
    """The text of a message's content: a string as is, the text parts of a list joined."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict)
                       and p.get("type") in ("text", "input_text", "output_text"))
    return "" if content is None else str(content)


def image_detail(part: dict[str, Any]) -> str | None:
    """The `detail` of an image part, in either shape (inside `image_url` or beside it)."""
    inner = part.get("image_url")
    return (inner.get("detail") if isinstance(inner, dict) else None) or part.get("detail")


def map_image_parts(messages: Sequence[dict[str, Any]],
                    replace: Callable[[dict[str, Any], str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every image part replaced by `replace(part, url)`; text parts, string
    contents and the messages themselves are kept as they are."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [part if (url := image_url_of(part)) is None else replace(part, url)
                                               for part in content]}
        out.append(message)
    return out


def hashed_view(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every inlined image replaced by its content hash: what the completion cache
    key covers. The same pixels give the same key however they were referenced; text-only
    messages are returned unchanged, so keys of text evals do not move."""
    if not has_images(messages):
        return list(messages)

    def hashed(part: dict[str, Any], url: str) -> dict[str, Any]:
        if not url.startswith("data:"):
            return part
        try:
            digest = hashlib.sha256(decode_data_url(url)[1]).hexdigest()
        except ImageError:
            digest = hashlib.sha256(url.encode()).hexdigest()
        return {"type": "image", "sha256": digest, "detail": image_detail(part)}

    return map_image_parts(messages, hashed)


def check_image_count(messages: Sequence[dict[str, Any]]) -> None:
    """At most MAX_IMAGES images in one example."""
    count = sum(1 for _ in iter_image_urls(messages))
    if count > MAX_IMAGES:
        raise ImageError(f"{count} images in one example; the limit is {MAX_IMAGES}", reason="too_many_images")


# -- thumbnails for pages --------------------------------------------------------------------------
THUMB_SIDE = 160
THUMB_MAX_BYTES = 48 * 1024


def thumbnail_data_url(url: str, side: int = THUMB_SIDE, max_bytes: int = THUMB_MAX_BYTES) -> str | None:
    """A small inline copy of a data-URL image for an HTML page (downscaled with Pillow, re-encoded
    as JPEG, at most `max_bytes`), or None when it cannot be decoded or stays too large. Never
    fetches anything: only data URLs are accepted."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    try:
        _, data = decode_data_url(url)
        with open_image(data) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side))
            for quality in (80, 60, 40):
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG", quality=quality)
                if buffer.tell() <= max_bytes:
                    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a page shows a placeholder rather than failing
        return None
    return None


# -- rendering a prompt's parts for one item -------------------------------------------------------
def render_parts(messages: Sequence[dict[str, Any]], item: Any) -> list[dict[str, Any]]:
    """Fill the templates of messages whose content may be a list of parts, for one
    `flywheel.data.Item`: text parts become `{type: text}`, image parts are loaded, checked and
    inlined as `{type: image_url}` data URLs. A message whose parts are all text becomes a plain
    string (so text models and text cache keys are unaffected). Raises
    graders.TemplateVariableError for a missing field and ImageError naming the item and part."""
    import graders

    access = item.image_access or ImageAccess(root=item.source.parent if item.source else None)
    out: list[dict[str, Any]] = []
    count = 0
    for index, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, list):
            out.append({"role": message["role"], "content": graders.render_template(content, item=item.fields)})
            continue
        parts: list[dict[str, Any]] = []
        for position, part in enumerate(content):
            kind = part.get("type")
            if kind in ("input_text", "text"):
                parts.append({"type": "text", "text": graders.render_template(part["text"], item=item.fields)})
                continue
            field_name = "file_id" if part.get("file_id") is not None else "image_url"
            template = part.get(field_name)
            if isinstance(template, dict):  # the chat shape {type: image_url, image_url: {url, detail}}
                template, detail = template.get("url"), template.get("detail")
            else:
                detail = part.get("detail")
            ref = graders.render_template(template, item=item.fields) if isinstance(template, str) else template
            where = f"{item.where}: input[{index}].content[{position}].{field_name}"
            try:
                image = load_image(ref, access)
            except ImageError as exc:
                raise ImageError(f"{where}: {short_ref(ref)}: {exc}", reason=exc.reason) from None
            count += 1
            if count > MAX_IMAGES:
                raise ImageError(f"{item.where}: more than {MAX_IMAGES} images in one example "
                                 f"(input[{index}].content[{position}] is image {count}); the limit is {MAX_IMAGES}",
                                 reason="too_many_images")
            parts.append(image_part(image, detail))
        if all(p["type"] == "text" for p in parts):
            out.append({"role": message["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message["role"], "content": parts})
    return out


def prompt_has_images(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether a prompt's messages (templates, before rendering) have image parts."""
    return any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") in ("input_image", "image_url") for p in m["content"])
        for m in messages)


def check_item_images(messages: Sequence[dict[str, Any]], items: Sequence[Any]) -> int:
    """Render every item's images before anything is stored; the first bad one raises ImageError.
    Returns how many images were checked."""
    if not prompt_has_images(messages):
        return 0
    import graders

    checked = 0
    for item in items:
        try:
            rendered = render_parts(messages, item)
        except graders.TemplateVariableError:
            continue  # recorded per sample, as for text prompts
        checked += sum(1 for _ in iter_image_urls(rendered))
    return checked


class Thumbnails:
    """Thumbnails for one page: each distinct image made once, and no more than `max_total`
    bytes of them in all (past that, images are left out and counted in `omitted`)."""

    def __init__(self, max_total: int = 2 * 1024 * 1024, side: int = THUMB_SIDE):
        self.max_total, self.side = max_total, side
        self.total = 0
        self.omitted = 0
        self._made: dict[str, str | None] = {}

    def of(self, url: str) -> str | None:
        """The thumbnail data URL of an inline image, or None (not inline, undecodable, over budget)."""
        key = hashlib.sha256(url.encode()).hexdigest()
        if key in self._made:
            return self._made[key]
        thumb = thumbnail_data_url(url, self.side)
        if thumb is not None and self.total + len(thumb) > self.max_total:
            self.omitted += 1
            thumb = None
        elif thumb is not None:
            self.total += len(thumb)
        self._made[key] = thumb
        return thumb

    def for_messages(self, messages: Sequence[dict[str, Any]] | None) -> list[str]:
        """Thumbnails of every image in a conversation, in order (those that could be made)."""
        return [t for t in (self.of(u) for u in iter_image_urls(messages)) if t is not None]


def describe_content(content: Any) -> str:
    """A message's content as plain text for pages and diffs: text parts as they are, images as
    `[image: REF]` (data URLs cut to their media type)."""
    if not isinstance(content, list):
        return "" if content is None else str(content)
    out = []
    for part in content:
        url = image_url_of(part)
        if url is not None:
            out.append(f"[image: {short_ref(url)}]")
        elif isinstance(part, dict):
            out.append(str(part.get("text", "")))
    return "".join(out)
