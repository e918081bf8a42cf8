"""Shared fixtures: tiny random-init models of every supported architecture (no download), a
small BPE tokenizer trained on our own data, and the real embedded model loaded once."""

from __future__ import annotations

import os
from pathlib import Path

# before torch starts OpenMP: idle threads sleep instead of spinning (the app's tests run a server and its
# clients in one process on 2 cores, where spinning threads slowed generation by an order of magnitude)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1] / "steering_lab" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def pytest_configure(config):
    config.addinivalue_line("markers", "real: uses the real embedded SmolLM2 model")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = []
    for f in sorted(DATA.iterdir()):
        if f.suffix in (".txt", ".jsonl"):
            corpus.extend(f.read_text().splitlines())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str, vocab: int, bos: int = 1, eos: int = 4):
    import transformers as tf

    ids = dict(bos_token_id=bos, eos_token_id=eos)
    common = dict(**ids, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=8, **common)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=8, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=8, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(head_dim=8, **common)
    if arch == "phi3":
        return tf.Phi3Config(pad_token_id=0, **common)
    if arch == "gpt2":
        return tf.GPT2Config(**ids, vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**ids, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=256)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox"]


def make_tiny(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from steering_lab.model import LoadedModel

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel.wrap(model, tokenizer, name=f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny(tiny_tokenizer):
    """A tiny random Llama (4 blocks, d_model 32) with our tokenizer and a chat template."""
    return make_tiny("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny Llama saved as a local model directory (the from_pretrained path)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from steering_lab.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def sentiment_vector(smol):
    from steering_lab.datasets import load_preset
    from steering_lab.extract import extract

    vec, scan = extract(smol, load_preset("sentiment"), "mean_diff")
    return vec, scan
