import math

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.intervene import Steer
from steering_lab.metrics import (
    compliance_rate,
    distinct_n,
    is_refusal,
    kl_from_logits,
    mean_distinct_n,
    over_refusal_rate,
    refusal_rate,
    score_texts,
)


def test_refusal_detection():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")  # curly apostrophes
    assert is_refusal("AS AN AI, I must decline.")
    assert not is_refusal("Sure! Here is a recipe for soup.")
    long = "Sure, here is a long answer. " * 10 + "I cannot stress this enough."
    assert is_refusal(long) and not is_refusal(long, opening=True)


def test_rates():
    texts = ["I cannot do that.", "Here you go.", "Sorry, but no.", "Of course."]
    assert refusal_rate(texts) == 0.5
    assert compliance_rate(texts) == 0.5
    assert over_refusal_rate(["Sure.", "Okay."]) == 0.0
    with pytest.raises(UserError):
        refusal_rate([])


def test_distinct_n():
    assert distinct_n("a b c d", 2) == 1.0
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert distinct_n("one", 2) == 0.0
    assert distinct_n(["a b", "a b"], 2) == 0.5  # pooled
    assert mean_distinct_n(["a b", "a b"], 2) == 1.0  # per text
    assert distinct_n("The the THE", 1) == pytest.approx(1 / 3)  # case-insensitive


def test_kl_from_logits():
    p = torch.tensor([[[0.0, 0.0]]])
    q = torch.tensor([[[0.0, math.log(3.0)]]])  # q = (1/4, 3/4), p = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_from_logits(p, q)[0]) == pytest.approx(expected, abs=1e-6)
    assert float(kl_from_logits(p, p)[0]) == 0.0
    mask = torch.tensor([[0.0]])
    assert float(kl_from_logits(p, q, mask)[0]) == 0.0


def test_score_texts_against_manual_computation(tiny):
    prompts = ["How was your weekend?", "Describe a library."]
    texts = ["It was good.", "Quiet and full of books."]
    v = torch.randn(tiny.d_model)
    scores = score_texts(tiny, prompts, texts, Steer(v, [0.0, 2.0], layers=[1]))
    assert scores.kl[0] == 0.0 and scores.kl[1] > 0
    for i in range(2):
        p_ids = tiny.encode_prompt(prompts[i])
        t_ids = tiny.encode(texts[i], special=False)
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1)
        nll = -logp.gather(-1, torch.tensor(t_ids)[:, None]).mean()
        assert scores.perplexity[i] == pytest.approx(math.exp(float(nll)), rel=1e-4)
        assert scores.n_tokens[i] == len(t_ids)
    # batch size does not change anything
    again = score_texts(tiny, prompts, texts, Steer(v, [0.0, 2.0], layers=[1]), batch_size=1)
    assert again.perplexity == pytest.approx(scores.perplexity, rel=1e-5)
    assert again.kl == pytest.approx(scores.kl, rel=1e-4, abs=1e-7)


def test_score_texts_keeps_row_masks_across_batches(tiny):
    prompts = ["How was your weekend?", "Describe a library."]
    texts = ["It was good.", "Quiet and full of books."]
    v = torch.randn(tiny.d_model)
    item = Steer(v, 2.0, layers=[1], rows=[False, True])  # only the second text is steered
    for batch_size in (1, 2):
        scores = score_texts(tiny, prompts, texts, item, batch_size=batch_size)
        assert scores.kl[0] == 0.0 and scores.kl[1] > 0
