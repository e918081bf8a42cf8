import pytest
import torch

from steering_lab.activations import collect, pad_left, pool_weights, tokenize_example
from steering_lab.errors import UserError
from steering_lab.intervene import capture

PROMPTS = ["Tell me about the weather today.", "Hi", "Describe a library in a few words, please."]
RESPONSES = ["It is sunny and warm.", "Hello!", "Quiet rooms full of books."]


def test_pad_left():
    ids, mask, pos = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(UserError):
        pad_left([], 0)


def test_pool_weights():
    w = pool_weights([4, 3], [2, 3], 5, "last")
    assert w.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    w = pool_weights([4, 3], [2, 3], 5, "mean")  # skips the first real token
    assert w.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]
    w = pool_weights([4, 5], [2, 3], 5, "response_mean")
    assert w.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    with pytest.raises(UserError, match="non-empty response"):
        pool_weights([3], [3], 3, "response_mean")


def _single(lm, prompt, response, position, layer):
    ids, n_prompt = tokenize_example(lm, prompt, response)
    with torch.no_grad(), capture(lm, [layer]) as cap:
        lm.model(input_ids=torch.tensor([ids]))
    h = cap.last(layer)[0]
    if position == "last":
        return h[n_prompt - 1]
    if position == "mean":
        return h[1:n_prompt].mean(0)
    if position == "max":
        return h[1:n_prompt].amax(0)
    return h[n_prompt:].mean(0)


@pytest.mark.parametrize("position", ["last", "mean", "max", "response_mean"])
def test_batched_collection_equals_one_at_a_time(tiny, position):
    acts = collect(tiny, PROMPTS, RESPONSES, position=position, batch_size=3)
    assert acts.acts.shape == (3, tiny.n_layers, tiny.d_model)
    assert acts.layers == list(range(tiny.n_layers))
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        for k in (0, 2, 3):
            torch.testing.assert_close(acts.at(k)[i], _single(tiny, p, r, position, k), atol=1e-5, rtol=1e-4)


def test_layer_subset_and_batch_size_do_not_change_results(tiny):
    full = collect(tiny, PROMPTS, batch_size=1)
    part = collect(tiny, PROMPTS, layers=[1, 2], batch_size=2)
    assert part.layers == [1, 2]
    torch.testing.assert_close(part.acts, full.acts[:, 1:3], atol=1e-5, rtol=1e-4)
    assert (part.token_norms > 0).all()


def test_response_tokens_are_exactly_the_response(tiny):
    ids, n_prompt = tokenize_example(tiny, PROMPTS[0], RESPONSES[0])
    assert tiny.tokenizer.decode(ids[n_prompt:]) == RESPONSES[0]


def test_bad_input(tiny):
    with pytest.raises(UserError, match="no examples"):
        collect(tiny, [])
    with pytest.raises(UserError, match="needs responses"):
        collect(tiny, PROMPTS, position="response_mean")
    with pytest.raises(UserError, match="unknown position"):
        collect(tiny, PROMPTS, position="first")
    with pytest.raises(UserError, match="2 responses"):
        collect(tiny, PROMPTS, RESPONSES[:2])


def test_batched_prompt_encoding_equals_one_by_one(tiny):
    from steering_lab.activations import encode_many

    prompts = ["Tell me about your weekend.", "What is 2 + 2?", "  spaces  and\nnewlines  "]
    for system in (None, "You are terse."):
        for chat in (True, False):
            assert encode_many(tiny, prompts, chat=chat, system=system) == [
                tiny.encode_prompt(p, system=system, chat=chat) for p in prompts]
