"""Rollout precision (flowtracer.generation.precision): the dtype cast, the sampler's recorded
log-probs, and how `sampling.dtype: auto` resolves."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import flowtracer.generation.precision as prec
from flowtracer.config import SamplingConfig
from flowtracer.generation import generate, row_seeds, sample
from flowtracer.model.forward import teacher_forced_pass

PROMPTS = ["What is 2 + 3?", "Add 17 and 5, then tell me the sum please.", "9 - 4 = ?"]


def _learner_logprobs(model, gen, temperature):
    out = teacher_forced_pass(model, gen.input_ids, gen.attention_mask, capture_layers=None,
                              stats_mask=gen.response_mask, temperature=temperature)
    return out.logprobs


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("top_k", [0, 5])
def test_recorded_logprobs_are_the_tempered_full_distribution(seeded, top_k):
    """A float32 sampler records exactly what the float32 learner computes: log_softmax(logits / T)
    of the untruncated distribution (top-k is not applied, as in the learner), for HF's sampler and
    for the per-row seeded one."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    g, t = 3, 0.7
    cfg = SamplingConfig(num_generations=g, max_new_tokens=12, temperature=t, top_k=top_k, generation_batch_size=3)
    seeds = row_seeds(0, 0, list(range(len(PROMPTS))), g) if seeded else None
    torch.manual_seed(0)
    gen = generate(model, tok, PROMPTS, [None] * len(PROMPTS), cfg, row_seeds=seeds, record_logprobs=True)
    resp = gen.response_mask
    assert gen.sampler_logprobs.shape == gen.input_ids.shape and resp.sum() > 10
    assert bool((gen.sampler_logprobs[~resp] == 0).all()) and bool((gen.sampler_logprobs[resp] < 0).all())
    want = _learner_logprobs(model, gen, t)
    torch.testing.assert_close(gen.sampler_logprobs[resp], want[resp], atol=1e-4, rtol=0)
    torch.manual_seed(0)
    plain = generate(model, tok, PROMPTS, [None] * len(PROMPTS), cfg, row_seeds=seeds)
    assert plain.sampler_logprobs is None and torch.equal(plain.input_ids, gen.input_ids)  # recording changes nothing


def test_bf16_rollouts_cast_for_the_call_only_and_differ_from_float32_by_bf16_rounding():
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    cfg = SamplingConfig(num_generations=2, max_new_tokens=10, temperature=1.0, dtype="bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16-mixed training_step around it: turned off
        gen = sample(model, tok, PROMPTS, [None] * len(PROMPTS), cfg, record_logprobs=True)
    for n, p in model.named_parameters():  # the same float32 parameters, untouched
        assert p is before[n][0] and p.dtype == torch.float32 and torch.equal(p, before[n][1])
    resp = gen.response_mask
    diff = (gen.sampler_logprobs - _learner_logprobs(model, gen, 1.0))[resp].abs()
    assert 0 < float(diff.mean()) < 0.1  # bf16 rounding: close to the float32 learner, not equal


def test_frozen_parameters_are_cast_once_trainable_ones_every_call():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    seen = []
    for _ in range(2):
        with prec.rollout_dtype(model, torch.bfloat16) as n:
            assert n == 4 and all(p.dtype == torch.bfloat16 for p in model.parameters())
            seen.append([p.data.data_ptr() for p in model.parameters()])
    assert seen[0][:2] == seen[1][:2]  # frozen: the cached copy
    with torch.no_grad():
        model[0].weight.add_(1.0)  # changed in place: its version moved, so it is cast again
    with prec.rollout_dtype(model, torch.bfloat16):
        assert model[0].weight.data_ptr() != seen[0][0]
        w = model[0].weight.clone()
    assert torch.equal(w, model[0].weight.to(torch.bfloat16))  # the copy of the changed weight


def test_auto_resolves_to_bf16_only_for_16_bit_training_on_native_hardware(monkeypatch):
    f32, bf16 = torch.float32, torch.bfloat16
    assert prec.resolve_dtype("auto", weights=f32, learner_half=False, device="cpu")[0] == f32
    assert prec.resolve_dtype("bfloat16", weights=f32, learner_half=False, device="cpu") == (bf16, "set")
    assert prec.resolve_dtype("float32", weights=bf16, learner_half=True, device="cpu") == (f32, "set")
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert prec.resolve_dtype("auto", weights=f32, learner_half=True, device="cpu") == (
        bf16, "auto: training in 16 bits, CPU AVX512-BF16")
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset({"avx2"}))
    dtype, why = prec.resolve_dtype("auto", weights=f32, learner_half=True, device="cpu")
    assert dtype == f32 and "no native bf16" in why
    with pytest.raises(ValueError, match="sampling.dtype"):
        prec.resolve_dtype("fp8", weights=f32, learner_half=True, device="cpu")


@pytest.mark.parametrize(("vendor", "flags", "kind"), [
    ("AuthenticAMD", {"avx2", "fma"}, "amd-avx2"),
    ("GenuineIntel", {"avx2", "avx512f", "avx512_vnni"}, "intel-avx512"),
    ("GenuineIntel", {"avx2", "avx512f", "avx512_bf16"}, "intel-avx512-bf16"),
    ("GenuineIntel", {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "intel-avx512-amx"),
    ("", set(), "cpu-sse"),
])
def test_cpu_kind_names_the_bf16_hardware_so_results_files_do_not_mix_kinds(vendor, flags, kind):
    """Results files are named by the kind: an AMX part multiplies bf16 several-fold faster than a plain
    AVX512 one, so the two must not write to the same file."""
    assert prec.kind_name(vendor, frozenset(flags)) == kind


def test_recorder_aligns_with_generated_columns():
    rec = prec.LogprobRecorder(temperature=2.0)
    logits = [torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[1.0, 1.0, 0.0]])]
    drawn = torch.tensor([[2, 0]])
    rec(torch.tensor([[7]]), logits[0])  # step 0 sees the prompt
    rec(torch.tensor([[7, 2]]), logits[1])  # step 1 sees token 0 (= 2)
    got = rec.result(drawn)
    want = torch.stack([torch.log_softmax(logits[i][0] / 2.0, -1)[drawn[0, i]] for i in range(2)])
    torch.testing.assert_close(got[0], want)
