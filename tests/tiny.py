"""Tiny random models and a tiny character tokenizer for tests: no network, seconds to build."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_end|>", "<|im_start|>"]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable character, plus ChatML specials; eos = <|im_end|>."""
    chars = list(string.printable)  # includes \n, space, digits, letters, punctuation
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.padding_side = "left"
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB_SIZE = len(SPECIALS) + len(string.printable)

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
)

ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=8),
    "mistral": dict(model_type="mistral", sliding_window=6),
}


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A random causal LM of the given architecture, fp32, eval mode."""
    from transformers import AutoConfig

    spec = {**_COMMON, **ARCHS[arch], **overrides}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
