"""Anonymise PII in captured conversations before they are stored, exported or trained on.

    policy = RedactionPolicy(operator="replace")           # or parse_redact(True / "hash" / {...})
    redactor = Redactor(policy)
    clean = redactor.redact_json(example)                   # one conversation: one pseudonym scope
    redactor.report()  # {"policy": {...}, "entities": {"EMAIL_ADDRESS": 3, ...}, "conversations": 1}

Detection is `graders.pii.PIIDetector` (Microsoft Presidio's analyzer, pattern recognisers, no NLP
model); replacement is Presidio's AnonymizerEngine with one operator per entity kind:

* `replace` — a numbered tag per distinct value within a conversation: `<EMAIL_ADDRESS_1>`; the same
  address written twice in the conversation (user turn and assistant reply) gets the same tag, so
  the trained model still sees that the reply refers to what the user said.
* `mask` — every character replaced with `mask_char`, keeping `keep_last` characters visible.
* `hash` — `<EMAIL_ADDRESS_3f2a9c1d>`: HMAC-SHA256 of the normalised value, so a value gets the same
  pseudonym in every conversation redacted with the same key. The key comes from
  $FLYWHEEL_REDACT_KEY; without it a random key is drawn per Redactor (consistent within one export
  or training set, unlinkable across them). Never store the key beside the data: with it, short
  values (phone numbers) can be recovered by trying them all.

Only conversation text is redacted: message `content` (strings and text parts), `refusal`, tool call
`arguments`, and the `raw` text of malformed bodies. Model names, ids and metadata are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.errors import FlywheelError
from graders.pii import DEFAULT_ENTITIES, PrivacyUnavailable, check_entities, get_detector

REDACT_KEYS = frozenset({"content", "text", "refusal", "arguments", "raw"})
KEY_ENV = "FLYWHEEL_REDACT_KEY"


class PrivacyError(FlywheelError):
    """PII redaction or deletion cannot run: Presidio missing, a bad policy, nothing to delete."""


class RedactionPolicy(BaseModel):
    """How PII is found and replaced (the `redact:` setting)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Redact at all (false keeps text verbatim).")
    operator: Literal["replace", "mask", "hash"] = Field(
        default="replace", description="replace: <KIND_n> per conversation; mask: ****; hash: <KIND_hmac> (keyed).")
    entities: list[str] = Field(default_factory=lambda: list(_default_entities()),
                                description="Presidio entity kinds to redact (see graders.pii.KNOWN_ENTITIES).")
    min_score: float = Field(default=0.35, ge=0, le=1, description="Least detector confidence that is redacted.")
    mask_char: str = Field(default="*", min_length=1, max_length=1, description="mask: the replacement character.")
    keep_last: int = Field(default=0, ge=0, le=8, description="mask: characters left visible at the end.")

    @field_validator("entities")
    @classmethod
    def _entities(cls, value: list[str]) -> list[str]:
        return list(check_entities(value))

    def record(self, hash_key: str | None = None) -> dict[str, Any]:
        """What a training set or export records about the policy (never the hash key)."""
        out: dict[str, Any] = {"operator": self.operator, "entities": self.entities, "min_score": self.min_score,
                               "detector": detector_description()}
        if self.operator == "mask":
            out.update(mask_char=self.mask_char, keep_last=self.keep_last)
        if self.operator == "hash":
            out["hash_key"] = hash_key or "random"
        return out


def _default_entities() -> tuple[str, ...]:
    return DEFAULT_ENTITIES


def detector_description() -> str:
    """Which detector, which version: recorded with every redaction."""
    try:
        from importlib.metadata import version

        presidio = f"presidio-analyzer {version('presidio-analyzer')}"
    except Exception:  # noqa: BLE001 - not installed: say so
        presidio = "presidio-analyzer (not installed)"
    return f"{presidio}, pattern recognisers + cued-name recogniser, no NLP model"


def parse_redact(value: Any, *, where: str = "redact") -> RedactionPolicy | None:
    """A `redact:` setting: true/false, an operator name, or a mapping of RedactionPolicy fields."""
    if value is None or value is True:
        return RedactionPolicy()
    if value is False:
        return None
    if isinstance(value, str):
        value = {"operator": value}
    try:
        policy = RedactionPolicy.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise PrivacyError(f"{where}{'.' + field if field else ''}: {first['msg']}") from None
    return policy if policy.enabled else None


def _normalise(kind: str, value: str) -> str:
    if kind in ("PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN"):
        return re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return " ".join(value.split()).casefold()


class Redactor:
    """Applies one RedactionPolicy; counts what it replaced. Not thread-safe (one per thread)."""

    def __init__(self, policy: RedactionPolicy | None = None, *, hash_key: str | bytes | None = None):
        self.policy = policy or RedactionPolicy()
        try:
            self.detector = get_detector(tuple(self.policy.entities), self.policy.min_score)
            from presidio_anonymizer import AnonymizerEngine
            from presidio_anonymizer.entities import OperatorConfig
        except (PrivacyUnavailable, ImportError) as exc:
            raise PrivacyError(str(exc) if isinstance(exc, PrivacyUnavailable) else
                               "PII redaction needs presidio-anonymizer: pip install 'flywheel[privacy]'") from None
        self._engine = AnonymizerEngine()
        self._operator_config = OperatorConfig
        given = hash_key if hash_key is not None else os.environ.get(KEY_ENV)
        self._key_source = "given" if hash_key is not None else ("env" if given else "random")
        self._key = (given.encode() if isinstance(given, str) else given) if given else secrets.token_bytes(32)
        self.counts: Counter[str] = Counter()
        self.conversations = 0
        self._scope: dict[tuple[str, str], str] = {}
        self._found: dict[str, list[Any]] = {}
        self._known: dict[str, str] = {}
        self._alias: dict[tuple[str, str], str] = {}

    # -- scopes and operators -------------------------------------------------------------------
    def new_conversation(self) -> None:
        """Start a new pseudonym scope (replace: numbering starts again at 1)."""
        self._scope = {}
        self._found: dict[str, list[Any]] = {}
        self._known: dict[str, str] = {}
        self._alias: dict[tuple[str, str], str] = {}
        self.conversations += 1

    def _pseudonym(self, kind: str, value: str) -> str:
        self.counts[kind] += 1
        op = self.policy.operator
        if op == "mask":
            keep = min(self.policy.keep_last, max(len(value) - 1, 0))
            return self.policy.mask_char * (len(value) - keep) + (value[-keep:] if keep else "")
        if op == "hash":
            value = self._alias.get((kind, _normalise(kind, value)), value)
            key = (kind, _normalise(kind, value))
            digest = hmac.new(self._key, f"{key[0]}\0{key[1]}".encode(), hashlib.sha256).hexdigest()[:8]
            return f"<{kind}_{digest}>"
        return self._label(kind, value)

    def _label(self, kind: str, value: str) -> str:
        value = self._alias.get((kind, _normalise(kind, value)), value)
        key = (kind, _normalise(kind, value))
        if key not in self._scope:
            self._scope[key] = f"<{kind}_{sum(1 for k in self._scope if k[0] == kind) + 1}>"
        return self._scope[key]

    def _operators(self, kinds: set[str]) -> dict[str, Any]:
        def make(kind: str) -> Callable[[str], str]:
            return lambda value: self._pseudonym(kind, value)
        return {kind: self._operator_config("custom", {"lambda": make(kind)}) for kind in kinds}

    # -- text and JSON --------------------------------------------------------------------------
    def redact_text(self, text: str) -> str:
        """`text` with every detected entity replaced, in the current conversation's scope."""
        if not text:
            return text
        found = self._found.get(text)
        if found is None:
            found = self.detector.analyze(text)
        found = self._with_known(text, found)
        if not found:
            return text
        if self.policy.operator == "replace":  # number values in reading order (Presidio works backwards)
            for r in sorted(found, key=lambda r: r.start):
                self._label(r.entity_type, text[r.start:r.end])
        result = self._engine.anonymize(text=text, analyzer_results=found, merge_entities_with_spaces=False,
                                        operators=self._operators({r.entity_type for r in found}))
        return result.text

    def _with_known(self, text: str, found: list[Any]) -> list[Any]:
        """Add the other occurrences of values this conversation already revealed as PII: a name
        the user gave once ("my name is Ann Lee") is replaced in the reply's "Thanks Ann Lee" too."""
        if not self._known:
            return found
        from presidio_analyzer import RecognizerResult

        extra = []
        for surface, kind in self._known.items():
            flags = 0 if kind == "PERSON" else re.IGNORECASE  # "Will" the person, not "will" the verb
            for match in re.finditer(rf"(?<!\w){re.escape(surface)}(?!\w)", text, flags):
                if all(match.end() <= r.start or match.start() >= r.end for r in [*found, *extra]):
                    extra.append(RecognizerResult(kind, match.start(), match.end(), 0.5))
        return [*found, *extra] if extra else found

    def redact_json(self, value: Any, *, new_conversation: bool = True) -> Any:
        """A copy of a request, response or training row with its conversation text redacted
        (strings under `content`, `text`, `refusal`, `arguments`, `raw`), as one conversation:
        every text is analysed first, then each value found anywhere is replaced everywhere."""
        if new_conversation:
            self.new_conversation()
        texts: list[str] = []
        self._collect(value, None, texts)
        for text in texts:
            if text not in self._found:
                self._found[text] = found = self.detector.analyze(text)
                for r in found:
                    surface = text[r.start:r.end]
                    parts = surface.split() if r.entity_type == "PERSON" else []
                    for part in [surface, *(p for p in parts if len(parts) > 1)]:
                        if len(part) >= 3:
                            self._known.setdefault(part, r.entity_type)
                        if part is not surface:  # "Thanks Ann" gets Ann Lee's pseudonym
                            self._alias.setdefault(("PERSON", _normalise("PERSON", part)), surface)
        return self._walk(value, None)

    def _collect(self, value: Any, key: str | None, out: list[str]) -> None:
        if isinstance(value, str):
            if key in REDACT_KEYS and value:
                out.append(value)
        elif isinstance(value, list):
            for v in value:
                self._collect(v, key if key in REDACT_KEYS else None, out)
        elif isinstance(value, dict):
            for k, v in value.items():
                self._collect(v, k if k in REDACT_KEYS else None, out)

    def _walk(self, value: Any, key: str | None) -> Any:
        if isinstance(value, str):
            return self.redact_text(value) if key in REDACT_KEYS else value
        if isinstance(value, list):
            return [self._walk(v, key if key in REDACT_KEYS else None) for v in value]
        if isinstance(value, dict):
            return {k: self._walk(v, k if k in REDACT_KEYS else None) for k, v in value.items()}
        return value

    def redact_json_text(self, text: str | None) -> str | None:
        """A stored JSON body redacted as one conversation; text that is not JSON is redacted as text."""
        if not text:
            return text
        try:
            value = json.loads(text)
        except ValueError:
            self.new_conversation()
            return self.redact_text(text)
        return json.dumps(self.redact_json(value), ensure_ascii=False)

    def redact_capture(self, row: dict[str, Any]) -> dict[str, Any]:
        """A capture row (as the proxy writes it) with request and response redacted together:
        one conversation, so the reply's pseudonyms match the request's."""
        out = dict(row)
        bodies: dict[str, Any] = {}
        for column in ("request_json", "response_json"):
            if out.get(column):
                try:
                    bodies[column] = json.loads(out[column])
                except ValueError:
                    bodies[column] = {"raw": out[column]}
        redacted = self.redact_json(bodies)
        for column, body in redacted.items():
            plain = out[column] == bodies[column].get("raw") if isinstance(bodies[column], dict) else False
            out[column] = body["raw"] if plain else json.dumps(body, ensure_ascii=False)
        if out.get("error"):
            out["error"] = self.redact_text(out["error"])
        return out

    def report(self) -> dict[str, Any]:
        """The policy applied and how many entities of each kind were replaced."""
        return {"policy": self.policy.record(self._key_source), "entities": dict(sorted(self.counts.items())),
                "replaced": sum(self.counts.values()), "conversations": self.conversations}
