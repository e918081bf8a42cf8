import copy

import pytest
import torch
from conftest import ARCHS, make_tiny

from steering_lab.errors import UserError
from steering_lab.generate import generate
from steering_lab.model import LoadedModel, find_layers, load_model, pick_dtype

EXPECTED_PATH = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_found_for_each_architecture(tiny_tokenizer, arch):
    lm = make_tiny(arch, tiny_tokenizer)
    assert lm.layers_path == EXPECTED_PATH.get(arch, "model.layers")
    assert lm.n_layers == 4 and lm.d_model == 32
    assert lm.layers is find_layers(lm.model)[1]
    assert lm.device.type == "cpu" and lm.dtype == torch.float32
    assert not lm.is_split


def test_layers_path_override_and_errors(tiny):
    lm = LoadedModel.wrap(tiny.model, tiny.tokenizer, layers_path="model.layers")
    assert lm.n_layers == 4
    with pytest.raises(UserError, match="no attribute path"):
        LoadedModel.wrap(tiny.model, tiny.tokenizer, layers_path="model.blocks")
    with pytest.raises(UserError, match="cannot find the decoder blocks"):
        find_layers(torch.nn.Linear(2, 2))


def test_local_directory_loads_through_from_pretrained(tiny, tiny_dir):
    lm = load_model(tiny_dir)
    assert lm.name == str(tiny_dir) and lm.n_layers == 4
    ids = torch.tensor([tiny.encode_prompt("Hello there")])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    assert generate(lm, ["Hello there"], max_new_tokens=5) == generate(tiny, ["Hello there"], max_new_tokens=5)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="not a model directory"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_model("./no/such/dir")


def test_tokenizer_and_config_are_not_mutated(tiny):
    tok, cfg = tiny.tokenizer, tiny.model.config
    before_tok = (tok.pad_token, tok.padding_side, len(tok), tok.chat_template)
    before_cfg = copy.deepcopy(cfg.to_dict())
    assert tok.pad_token is None  # our tiny tokenizer has none: padding must not need one
    generate(tiny, ["one prompt", "a somewhat longer second prompt"], max_new_tokens=4)
    assert (tok.pad_token, tok.padding_side, len(tok), tok.chat_template) == before_tok
    assert cfg.to_dict() == before_cfg


def test_chat_prompt(tiny):
    text = tiny.chat_prompt("Hi", system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.chat_prompt("Hi", chat=False) == "Hi"
    ids = tiny.encode_prompt("Hi")
    assert ids[0] == tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float13")


@pytest.mark.real
def test_embedded_default_and_its_cache(smol):
    assert smol.name == "SmolLM2-135M-Instruct"
    assert smol.n_layers == 30 and smol.d_model == 576
    assert smol.layers_path == "model.layers"
    assert smol.has_chat_template


@pytest.mark.real
def test_gguf_file_path_matches_cached_copy(smol):
    """Loading the .gguf file itself (slow de-quantization) gives bit-identical logits to the
    safetensors copy the embedded default loads from."""
    from steering_lab.model import embedded_gguf_path

    lm = load_model(embedded_gguf_path())
    assert lm.n_layers == 30
    ids = torch.tensor([smol.encode_prompt("What is the capital of France?")])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, smol.model(input_ids=ids).logits)
    assert lm.tokenizer.chat_template == smol.tokenizer.chat_template
