"""`text_similarity`: fuzzy_match, bleu, gleu, meteor, cosine, rouge_1..rouge_5, rouge_l (reference §2.2).

The platform publishes only the metric names and that fuzzy_match uses rapidfuzz. Each metric here
is computed by a well-kept library, called as documented below; tests check parity with direct
calls of those libraries on real text pairs. `input` is the hypothesis, `reference` the reference.

| metric        | computed as                                                                       |
|---------------|-----------------------------------------------------------------------------------|
| fuzzy_match   | rapidfuzz `fuzz.WRatio(input, reference, processor=utils.default_process) / 100`  |
|               | (the platform graders guide's own fuzzy example)                                  |
| bleu          | sacrebleu `sentence_bleu(input, [reference]).score / 100` (13a tokens, exp        |
|               | smoothing, effective order: the sentence-level defaults)                          |
| gleu          | nltk `sentence_gleu([ref_tokens], hyp_tokens)` (n = 1..4)                          |
| meteor        | nltk `meteor_score([ref_tokens], hyp_tokens, wordnet=...)` (lower-cased, Porter   |
|               | stems, WordNet synonyms from graders.wordnet; exact + stem only without WordNet)  |
| rouge_N / L   | rouge-score `RougeScorer(["rougeN"/"rougeL"]).score(reference, input)` F-measure  |
|               | (its tokenizer: lower-case, alphanumeric tokens, no stemming)                     |
| cosine        | cosine of all-MiniLM-L6-v2 embeddings (normalised), clipped to [0, 1]             |

gleu and meteor tokens come from NLTK's `NLTKWordTokenizer` (what `word_tokenize` uses after its
sentence split; it needs no downloaded data). Every score is clipped to [0, 1]. One deviation:
identical texts that the library scores 0 because nothing is left to compare after its own
processing (`{}` under fuzzy_match, two empty strings) score 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from graders.base import DEFAULT_PASS_THRESHOLD, Grader, gc_paused
from graders.config import TextSimilarityGraderConfig
from graders.errors import TemplateVariableError
from graders.grade import Grade, passes, shorten
from graders.templates import Template

ROUGE_TYPES = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}


# --- metric functions (hypothesis, reference) -> float, each from its library ----------------------

def fuzzy_match(hypothesis: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return fuzz.WRatio(hypothesis, reference, processor=utils.default_process) / 100.0


def bleu(hypothesis: str, reference: str) -> float:
    return _bleu_metric().sentence_score(hypothesis, [reference]).score / 100.0


@lru_cache(maxsize=1)
def _bleu_metric() -> Any:
    from sacrebleu.metrics import BLEU

    # exactly what sacrebleu.sentence_bleu() builds per call, built once
    return BLEU(effective_order=True)


@lru_cache(maxsize=1)
def _word_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Word tokens as NLTK's word_tokenize makes them, without its (downloaded) sentence splitter."""
    return _word_tokenizer().tokenize(text)


def gleu(hypothesis: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return sentence_gleu([tokenize(reference)], tokenize(hypothesis))


def meteor(hypothesis: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    from graders.wordnet import NoWordNet, load_wordnet

    wordnet = load_wordnet() or NoWordNet()
    return meteor_score([tokenize(reference)], tokenize(hypothesis), wordnet=wordnet)


@lru_cache(maxsize=8)
def _rouge_scorer(rouge_type: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=False)


def rouge(rouge_type: str) -> Callable[[str, str], float]:
    def score(hypothesis: str, reference: str) -> float:
        return _rouge_scorer(rouge_type).score(reference, hypothesis)[rouge_type].fmeasure

    score.__name__ = rouge_type
    return score


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    **{name: rouge(kind) for name, kind in ROUGE_TYPES.items()},
}


def similarity(metric: str, hypothesis: str, reference: str, *, embedder: Any = None) -> float:
    """One metric's raw value for one pair (cosine embeds both texts)."""
    if metric == "cosine":
        return cosine_batch([hypothesis], [reference], embedder=embedder)[0]
    return METRICS[metric](hypothesis, reference)


def cosine_batch(hypotheses: list[str], references: list[str], *, embedder: Any = None) -> list[float]:
    """Cosine similarities for many pairs with ONE embedding call over the distinct texts."""
    from graders.embeddings import cosine_rows, default_embedder

    embedder = embedder or default_embedder()
    distinct = list(dict.fromkeys([*hypotheses, *references]))
    if not distinct:
        return []
    vectors = embedder.embed(distinct)
    row = {text: i for i, text in enumerate(distinct)}
    a = vectors[[row[t] for t in hypotheses]]
    b = vectors[[row[t] for t in references]]
    return [float(x) for x in cosine_rows(a, b)]


def clip01(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))


# --- the grader ---------------------------------------------------------------------------------

class TextSimilarityGrader(Grader):
    type = "text_similarity"

    def __init__(self, config: TextSimilarityGraderConfig, *, embedder: Any = None):
        super().__init__(config)
        self.input = Template(config.input)
        self.reference = Template(config.reference)
        self.metric = config.evaluation_metric
        self.threshold = config.pass_threshold if config.pass_threshold is not None else DEFAULT_PASS_THRESHOLD
        self.embedder = embedder
        self._fn = METRICS.get(self.metric)

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        text = self.input.render(item, sample)
        ref = self.reference.render(item, sample)
        if self._fn is None:  # cosine, one pair
            raw = cosine_batch([text], [ref], embedder=self.embedder)[0]
        else:
            raw = self._fn(text, ref)
        return self._make(text, ref, raw)

    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        if self.metric != "cosine":
            with gc_paused():
                return super()._grade_prepared(samples, items)
        # cosine: render everything, then embed all distinct texts in one call
        out: list[Grade | None] = [None] * len(samples)
        pending: list[tuple[int, str, str]] = []
        for i, (sample, item) in enumerate(zip(samples, items)):
            if isinstance(sample, Exception):
                out[i] = self._failure("sample_parse_error", str(sample))
                continue
            try:
                pending.append((i, self.input.render(item, sample), self.reference.render(item, sample)))
            except TemplateVariableError as e:
                out[i] = self._failure("invalid_variable_error", str(e))
        if pending:
            try:
                values = cosine_batch([p[1] for p in pending], [p[2] for p in pending], embedder=self.embedder)
            except Exception as e:
                for i, _, _ in pending:
                    out[i] = self._failure("other_error", f"embedding failed: {type(e).__name__}: {e}")
            else:
                for (i, text, ref), raw in zip(pending, values):
                    out[i] = self._make(text, ref, raw)
        return out  # type: ignore[return-value]

    def _make(self, text: str, ref: str, raw: float) -> Grade:
        degenerate = raw == 0.0 and text == ref
        if degenerate:
            # identical texts the library could not compare (nothing left after its tokenisation or
            # processing, e.g. '{}' under fuzzy_match, or two empty strings) are a perfect match
            raw = 1.0
        score = clip01(raw)
        ok = passes(score, self.threshold)
        verdict = "pass" if ok else "fail"
        feedback = (
            f"{self.metric} similarity {score:.3f} to reference {shorten(repr(ref), 60)} "
            f"(threshold {self.threshold:g}): {verdict}"
        )
        details = {
            "name": self.name, "type": self.type, "metric": self.metric, "input": text, "reference": ref,
            "pass_threshold": self.threshold,
        }
        if raw != score:
            details["raw_score"] = raw
        if degenerate:
            details["identical_texts_scored_1"] = True
        if self.metric == "meteor":
            from graders.wordnet import wordnet_source

            details["wordnet"] = wordnet_source()
        return Grade(score=score, passed=ok, feedback=feedback, details=details)
