"""Behaviour on the real embedded SmolLM2-135M-Instruct (loaded once per session)."""

import statistics

import pytest
import torch

from steering_lab.datasets import neutral_prompts
from steering_lab.generate import generate, generate_ids
from steering_lab.intervene import Steer, hook_count, steer
from steering_lab.metrics import distinct_n, mean_distinct_n, score_texts

pytestmark = pytest.mark.real


def test_sentiment_scan_and_recommendation(sentiment_vector, smol):
    vec, scan = sentiment_vector
    assert vec.layers == list(range(30)) and vec.normalized
    rec = scan.row(vec.recommended_layer)
    assert 6 <= vec.recommended_layer <= 11 and rec.auroc >= 0.95
    assert vec.recommended_strength == pytest.approx(0.15 * rec.token_norm, abs=0.01)
    assert hook_count(smol.model) == 0


def test_negative_sentiment_steering_sours_answers_and_stays_fluent(sentiment_vector, smol):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vec, _ = sentiment_vector
    prompts = neutral_prompts()[:12]
    s = -vec.recommended_strength
    # one batch: rows 0-11 at strength 0, rows 12-23 at the negative recommended strength
    texts = generate(smol, prompts * 2, Steer(vec, [0.0] * 12 + [s] * 12), max_new_tokens=40)
    zero, steered = texts[:12], texts[12:]
    plain = generate(smol, prompts, max_new_tokens=40)  # no hooks at all
    assert zero == plain  # strength 0 is exactly the unsteered model

    vader = SentimentIntensityAnalyzer()
    before = statistics.mean(vader.polarity_scores(t)["compound"] for t in plain)
    after = statistics.mean(vader.polarity_scores(t)["compound"] for t in steered)
    assert before - after >= 0.4, (before, after, steered)

    # fluent: no runaway repetition, and the unsteered model still finds the text plausible
    assert mean_distinct_n(steered) >= 0.8 and min(distinct_n(t) for t in steered) >= 0.5, steered
    scores = score_texts(smol, prompts * 2, plain + steered)
    ppl_plain, ppl_steered = scores.perplexity[:12], scores.perplexity[12:]
    assert statistics.median(ppl_steered) <= 2 * statistics.median(ppl_plain), (ppl_plain, ppl_steered)


def test_batched_generation_equals_one_by_one(sentiment_vector, smol):
    vec, _ = sentiment_vector
    prompts = ["Tell me about your weekend.", "Describe a cup of coffee in detail, please.", "Hi!"]
    item = Steer(vec, -vec.recommended_strength)
    together = generate_ids(smol, prompts, item, max_new_tokens=12)
    for i, p in enumerate(prompts):
        assert generate_ids(smol, [p], item, max_new_tokens=12)[0] == together[i]


def test_strength_zero_logits_identical_on_real_model(sentiment_vector, smol):
    vec, _ = sentiment_vector
    ids = torch.tensor([smol.encode_prompt("What is the capital of France?")])
    with torch.no_grad():
        base = smol.model(input_ids=ids).logits
        with steer(smol, Steer(vec, 0.0, layers=vec.layers)):
            same = smol.model(input_ids=ids).logits
    assert torch.equal(base, same)
    assert hook_count(smol.model) == 0
