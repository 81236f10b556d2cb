"""PII detection with Microsoft Presidio, configured to run offline and without an NLP model.

    detector = get_detector()                       # cached per configuration
    for entity in detector.detect("mail me at ann@example.org"):
        print(entity.kind, entity.text)             # EMAIL_ADDRESS ann@example.org

Presidio's analyzer normally runs a spaCy pipeline (`en_core_web_lg`) for named entities. No
official spaCy English model installs from the package registries these machines reach (only
unofficial mirrors, which we do not use), so the analyzer runs with Presidio's `no_op` NLP engine
and pattern recognisers only:

* EMAIL_ADDRESS — Presidio's regex, its domain checked against tldextract's bundled public-suffix
  snapshot (never fetched: the stock recogniser downloads the list at run time);
* PHONE_NUMBER — Presidio's recogniser (Google's libphonenumber, several regions), run only on
  digit runs that can be phone numbers instead of the whole text (same matches, a fraction of the
  time: benchmarks/privacy.py compares the two);
* CREDIT_CARD (Luhn-checked), IBAN_CODE (checksum-checked), IP_ADDRESS, US_SSN — Presidio's own;
* PERSON — `CuedNameRecognizer` below: capitalised words after a cue ("my name is", "Dear",
  "Mr.", "Regards,", ...). It finds names that the text introduces and misses names that appear
  bare ("forward this to Ann Lee"); docs/privacy.md gives its measured recall. Without an NER model
  this is the honest limit.

`graders` never imports `flywheel`; the `pii` grader (graders/safety.py) and flywheel's redaction
(flywheel/privacy/redact.py) both use this detector. Presidio is the optional `privacy` extra.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEFAULT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "PERSON", "US_SSN")
# Presidio's other pattern recognisers, usable by name (`entities: [..., URL]`).
EXTRA_ENTITIES = ("URL", "CRYPTO", "MAC_ADDRESS", "UK_NHS", "US_PASSPORT", "US_BANK_NUMBER", "US_DRIVER_LICENSE",
                  "US_ITIN", "MEDICAL_LICENSE", "DATE_TIME")
KNOWN_ENTITIES = DEFAULT_ENTITIES + EXTRA_ENTITIES
DEFAULT_MIN_SCORE = 0.35
# A pseudonym flywheel.privacy.redact wrote (replace: `<KIND_3>`, hash: `<KIND_3f2a9c1d>`): not PII.
PSEUDONYM = re.compile(r"<[A-Z][A-Z_]*_(?:\d{1,6}|[0-9a-f]{8})>")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")


class PrivacyUnavailable(RuntimeError):
    """Presidio is not installed: `pip install 'flywheel[privacy]'`."""


@dataclass(frozen=True)
class Entity:
    """One detected span: its kind (Presidio's entity name), offsets, text and confidence."""

    kind: str
    start: int
    end: int
    text: str
    score: float


def check_entities(entities: Any) -> tuple[str, ...]:
    """Validate a list of entity kinds; ValueError names the unknown one."""
    out = tuple(dict.fromkeys(str(e).upper() for e in entities))
    unknown = [e for e in out if e not in KNOWN_ENTITIES]
    if unknown:
        raise ValueError(f"unknown PII entity {unknown[0]!r}; known: {', '.join(KNOWN_ENTITIES)}")
    if not out:
        raise ValueError("give at least one PII entity kind")
    return out


def _import_presidio() -> Any:
    try:
        import presidio_analyzer
    except ImportError:
        raise PrivacyUnavailable("PII detection needs Microsoft Presidio: pip install 'flywheel[privacy]' "
                                 "(presidio-analyzer, presidio-anonymizer)") from None
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    return presidio_analyzer


def _recognizers(entities: tuple[str, ...], nlp_engine: Any) -> list[Any]:
    presidio_analyzer = _import_presidio()
    from presidio_analyzer import EntityRecognizer, LocalRecognizer, RecognizerResult
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer, UsSsnRecognizer)

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's email recogniser with the public-suffix check on the bundled snapshot."""

        _extract = None

        def validate_result(self, pattern_text: str) -> bool:
            if OfflineEmailRecognizer._extract is None:
                import tldextract

                OfflineEmailRecognizer._extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
            return OfflineEmailRecognizer._extract(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    class CandidatePhoneRecognizer(PhoneRecognizer):
        """Presidio's phone recogniser (libphonenumber), run on each digit run that may be a number,
        with a margin of context, instead of on the whole text once per region:

        * a run inside another entity (`skip`: a card, an IBAN, an IP) is not tried;
        * a run that one region reads as a number is not tried in the others;
        * a run written in international form (`+...`) or after a phone word ("call", "mobile",
          "tel", ...) needs only a plausible length (libphonenumber's POSSIBLE), else it must be a
          VALID number of a region (Presidio's default), and a bare digit run with neither a
          separator nor a phone word is left alone (order and tracking numbers look like that)."""

        CANDIDATE = re.compile(r"[+(]?\d[\d \t().\-/]{4,22}\d(?:\s*(?:x|ext\.?)\s*\d{1,5})?", re.IGNORECASE)
        CUE = re.compile(r"(?:phone|call|mobile|cell|tel|fax|whatsapp|sms|text|reach|ring|dial)\w*"
                         r"(?:\W+(?:me|us|on|at|is|number|no|nr|my|our|the|him|her)){0,3}\W*$", re.IGNORECASE)

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                    skip: list[tuple[int, int]] = ()) -> list[Any]:
            import phonenumbers

            results = []
            for candidate in self.CANDIDATE.finditer(text):
                raw = candidate.group()
                if sum(c.isdigit() for c in raw) < 7:
                    continue
                if any(candidate.start() < end and start < candidate.end() for start, end in skip):
                    continue
                cued = raw.startswith("+") or bool(self.CUE.search(text[max(0, candidate.start() - 40):candidate.start()]))
                if not cued and raw.isdigit():
                    continue
                leniency = phonenumbers.Leniency.POSSIBLE if cued else self.leniency
                start = max(0, candidate.start() - 4)
                window = text[start:min(len(text), candidate.end() + 4)]
                for region in self.supported_regions:
                    found = [self._get_recognizer_result(m, window, region, nlp_artifacts)
                             for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=leniency)]
                    for result in found:
                        result.start += start
                        result.end += start
                    results += found
                    if found:
                        break
            return EntityRecognizer.remove_duplicates(results)

    class CardRecognizer(CreditCardRecognizer):
        """Presidio's card recogniser (Luhn-checked) plus Mastercard's 2-series (2221-2720), which
        its pattern lacks."""

        def __init__(self) -> None:
            from presidio_analyzer import Pattern

            two_series = Pattern("Mastercard 2-series", r"\b2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)(?:[- ]?\d{4}){3}\b",
                                 0.3)
            super().__init__(patterns=[*CreditCardRecognizer.PATTERNS, two_series])

    import regex  # Unicode classes (\p{Lu}) for names; Presidio depends on it

    class CuedNameRecognizer(LocalRecognizer):
        """Person names introduced by a cue: 1-3 capitalised words after "my name is", "name:",
        "Dear", "Mr./Ms./Dr.", a sign-off ("Regards,", "Thanks,"), "I am"/"this is" (two words)."""

        WORD = r"\p{Lu}(?:'\p{Lu})?\p{Ll}+(?:\p{Lu}\p{Ll}+)?(?:-\p{Lu}(?:'\p{Lu})?\p{Ll}+)?"
        STRONG = (r"my name is|my name's|name\s*:|full name\s*:|(?:first|last) name\s*:|dear|signed|sincerely,?"
                  r"|regards,?|best regards,?|kind regards,?|cheers,?|thanks,|thank you,|best,|"
                  r"(?:mr|mrs|ms|mx|miss|dr|prof)\.?|spoke (?:to|with)|speak (?:to|with)|ask for|contact person\s*:")
        WEAK = r"i am|i'm|this is|it's|hi|hello|hey|from|customer|patient|client|cc:?|attn:?"
        STOP = {"The", "This", "That", "There", "Team", "Support", "Customer", "Service", "All", "Sir", "Madam",
                "Everyone", "Sorry", "Happy", "Good", "Not", "Just", "Here", "Thanks", "Thank", "Regards", "Best",
                "Please", "Hi", "Hello", "Hey", "Dear", "And", "But", "So", "We", "You", "Your", "Our", "My", "It",
                "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Bank", "Account"}
        PATTERN = regex.compile(
            rf"(?:(?<![\w])(?i:(?P<strong>{STRONG}))[ \t]*\n?[ \t]*(?P<name1>{WORD}(?:[ \t]+{WORD}){{0,2}}))"
            rf"|(?:(?<![\w])(?i:(?P<weak>{WEAK}))[ \t]+(?P<name2>{WORD}(?:[ \t]+{WORD}){{1,2}}))")
        SCORE = 0.6

        def __init__(self) -> None:
            super().__init__(supported_entities=["PERSON"], supported_language="en")

        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            results = []
            for match in self.PATTERN.finditer(text):
                group = "name1" if match.group("name1") else "name2"
                words = match.group(group).split()
                while words and words[0] in self.STOP:
                    words.pop(0)
                while words and words[-1] in self.STOP:
                    words.pop()
                if not words:
                    continue
                name = " ".join(words)
                start = text.index(words[0], match.start(group))
                results.append(RecognizerResult("PERSON", start, start + len(name), self.SCORE,
                                                recognition_metadata={"recognizer_name": self.name,
                                                                      "recognizer_identifier": self.id}))
            return results

    own = {"EMAIL_ADDRESS": OfflineEmailRecognizer, "PHONE_NUMBER": CandidatePhoneRecognizer,
           "CREDIT_CARD": CardRecognizer, "IBAN_CODE": IbanRecognizer, "IP_ADDRESS": IpRecognizer,
           "US_SSN": UsSsnRecognizer, "PERSON": CuedNameRecognizer}
    recognizers = [own[e]() for e in entities if e in own]
    others = [e for e in entities if e not in own]
    if others:
        registry = presidio_analyzer.RecognizerRegistry(supported_languages=["en"])
        registry.load_predefined_recognizers(nlp_engine=nlp_engine, languages=["en"])
        recognizers += [r for r in registry.recognizers if set(r.supported_entities) & set(others)]
    return recognizers


class PIIDetector:
    """Finds PII spans in text with a Presidio AnalyzerEngine (pattern recognisers, no NLP model).

    Overlapping detections are resolved in favour of the higher score, then the longer span, so
    a card number is not also reported as a phone number."""

    def __init__(self, entities: tuple[str, ...] | list[str] = DEFAULT_ENTITIES, min_score: float = DEFAULT_MIN_SCORE):
        presidio_analyzer = _import_presidio()
        from presidio_analyzer.nlp_engine import NlpEngineProvider

        self.entities = check_entities(entities)
        self.min_score = min_score
        nlp = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "no_op", "models": [{"lang_code": "en", "model_name": "no_op"}]}).create_engine()
        registry = presidio_analyzer.RecognizerRegistry(supported_languages=["en"])
        self.phone = None
        for recognizer in _recognizers(self.entities, nlp):
            if recognizer.supported_entities == ["PHONE_NUMBER"] and hasattr(recognizer, "CANDIDATE"):
                self.phone = recognizer  # runs after the others, on the digit runs they left
            else:
                registry.add_recognizer(recognizer)
        self.analyzer = presidio_analyzer.AnalyzerEngine(nlp_engine=nlp, registry=registry,
                                                         supported_languages=["en"])
        self._others = [e for e in self.entities if e != "PHONE_NUMBER" or self.phone is None]
        self._cheap = re.compile(r"\d|@|[^\W\d_]")  # no digit, '@' or capitalised word: nothing to find

    def analyze(self, text: str) -> list[Any]:
        """Presidio's RecognizerResults for `text`, overlaps resolved, sorted by position."""
        if not text or not self._cheap.search(text):
            return []
        found = self.analyzer.analyze(text=text, language="en", entities=self._others,
                                      score_threshold=self.min_score) if self._others else []
        tags = [m.span() for m in PSEUDONYM.finditer(text)]  # already redacted: `<EMAIL_ADDRESS_1>`
        if tags:
            found = [r for r in found if all(r.end <= a or r.start >= b for a, b in tags)]
        if self.phone is not None and self.phone.SCORE >= self.min_score:
            found += self.phone.analyze(text, ["PHONE_NUMBER"], skip=[(r.start, r.end) for r in found] + tags)
        kept: list[Any] = []
        for result in sorted(found, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
            if all(result.end <= k.start or result.start >= k.end for k in kept):
                kept.append(result)
        return sorted(kept, key=lambda r: r.start)

    def detect(self, text: str) -> list[Entity]:
        """The PII entities in `text`, in order of position."""
        return [Entity(r.entity_type, r.start, r.end, text[r.start:r.end], r.score) for r in self.analyze(text)]


@lru_cache(maxsize=8)
def _cached(entities: tuple[str, ...], min_score: float) -> PIIDetector:
    return PIIDetector(entities, min_score)


def get_detector(entities: tuple[str, ...] | list[str] | None = None,
                 min_score: float = DEFAULT_MIN_SCORE) -> PIIDetector:
    """A shared detector per configuration (building the engine costs ~0.1 s)."""
    return _cached(check_entities(entities or DEFAULT_ENTITIES), float(min_score))
