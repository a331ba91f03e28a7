"""The fast engine (flowtracer.generation.fast) against the hf engine: the same tokens, EOS handling,
sampler log-probs and LoRA adapters; `auto` picks it only where it runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model, tiny_tokenizer

from flowtracer.config import SamplingConfig
from flowtracer.generation import ENGINES, engine_line, generate, resolve_engine
from flowtracer.generation.fast import unsupported_reason
from flowtracer.generation.sampler import row_seeds
from flowtracer.model.policy import merged_lora

PROMPTS = ["What is 2 + 3?", "Add 17 and 5, then tell me the sum please.", "1+1"]  # left padding
MODES = {
    "greedy": dict(temperature=0.0),
    # draw multinomial: the fast engine draws HF's own stream (its default inverse-CDF draw is tested below)
    "hf_sampler": dict(temperature=0.8, draw="multinomial"),
    "hf_sampler_top_k_top_p": dict(temperature=0.7, top_k=12, top_p=0.9, draw="multinomial"),
    "seeded": dict(temperature=1.0, top_p=0.95),
}


def _both(model, tok, mode: str, g: int = 3, tokens: int = 12, record: bool = True):
    """(hf, fast) generations with the same sampling settings, seeds and global RNG state."""
    base = SamplingConfig(num_generations=g, max_new_tokens=tokens, **MODES[mode])
    seeds = row_seeds(7, 3, list(range(len(PROMPTS))), g) if mode == "seeded" else None
    out = []
    for engine in ("hf", "fast"):
        torch.manual_seed(1234)  # HF's sampler draws from the global RNG; the fast engine must draw alike
        out.append(generate(model, tok, PROMPTS, [None] * len(PROMPTS), dataclasses.replace(base, engine=engine),
                            row_seeds=seeds, record_logprobs=record))
    return out


def _agreement(a, b) -> float:
    """Share of response positions (of the longer layout) where both engines drew the same token."""
    w = max(a.input_ids.shape[1], b.input_ids.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[1]), value=-1)  # noqa: E731
    resp = pad(a.response_mask.long()).bool() | pad(b.response_mask.long()).bool()
    return float((pad(a.input_ids) == pad(b.input_ids))[resp].float().mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fast_engine_draws_the_hf_engines_tokens(arch, mode):
    model, tok = tiny_model(arch), tiny_tokenizer()
    hf, fast = _both(model, tok, mode)
    # the agreement rate: the two engines differ only in float rounding, so a token differs only
    # where two logits tie within it; on these models none does
    assert _agreement(hf, fast) == 1.0
    assert torch.equal(hf.input_ids, fast.input_ids) and hf.responses == fast.responses
    assert torch.equal(hf.truncated, fast.truncated)
    assert torch.allclose(hf.sampler_logprobs, fast.sampler_logprobs, atol=1e-4)
    assert fast.response_mask.sum() > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_a_prefill_split_into_blocks_of_prompts_draws_the_hf_engines_tokens(monkeypatch, mode):
    from flowtracer.generation import fast
    calls = []
    real = fast.DecodeModel._forward
    monkeypatch.setattr(fast, "PREFILL_TOKENS", 8)  # narrower than the padded prompts: one prompt per block
    monkeypatch.setattr(fast.DecodeModel, "_forward",
                        lambda self, ids, *a: calls.append(ids.shape) or real(self, ids, *a))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hf, blocked = _both(model, tok, mode)
    prefill = [shape for shape in calls if shape[1] > 1]
    assert len(prefill) == len(PROMPTS) and all(shape[0] == 1 for shape in prefill)  # it did split
    assert _agreement(hf, blocked) == 1.0 and torch.equal(hf.input_ids, blocked.input_ids)
    assert torch.allclose(hf.sampler_logprobs, blocked.sampler_logprobs, atol=1e-4)


def _eos_prone(arch: str = "llama"):
    """A tiny model whose EOS logit is raised so that some rows stop early and others run on."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 6.0
    return model, tok


def test_rows_that_hit_eos_are_padded_and_the_loop_stops_when_all_have():
    model, tok = _eos_prone()
    hf, fast = _both(model, tok, "hf_sampler", g=4, tokens=24)
    assert torch.equal(hf.input_ids, fast.input_ids) and torch.equal(hf.response_mask, fast.response_mask)
    stopped = ~fast.truncated
    assert 0 < int(stopped.sum()) < len(stopped)  # both kinds of row present
    resp = fast.input_ids[:, fast.prompt_len:]
    after = ~fast.response_mask[:, fast.prompt_len:]
    assert (resp[after] == tok.pad_token_id).all()
    # the engine itself: pad after each row's first EOS, stopped flags, and no step past the last EOS
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    sampling = SamplingConfig(num_generations=4, max_new_tokens=200, temperature=0.0, engine="fast")
    new, stop = ENGINES["fast"](model, tok, ids, 4, sampling)
    is_eos = new == tok.eos_token_id
    assert stop.all() and new.shape[1] < 200
    first = is_eos.float().argmax(1)
    cols = torch.arange(new.shape[1])
    assert (new[cols > first[:, None]] == tok.pad_token_id).all()
    assert int(first.max()) == new.shape[1] - 1  # the last column is the last row's EOS


def _lora(model, seed: int = 0):
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # non-zero adapters, so they change the samples
    return peft


def test_live_and_merged_lora_adapters_match_hf_and_a_changed_adapter_is_picked_up():
    tok = tiny_tokenizer()
    peft = _lora(tiny_model("llama"))
    plain = generate(tiny_model("llama"), tok, PROMPTS, [None] * 3,
                     SamplingConfig(num_generations=2, max_new_tokens=10, temperature=0.0, engine="fast"))
    live_hf, live_fast = _both(peft, tok, "greedy", g=2, tokens=10, record=False)
    assert torch.equal(live_hf.input_ids, live_fast.input_ids)
    assert not torch.equal(plain.input_ids, live_fast.input_ids)  # the adapters do change the samples
    with merged_lora(peft):
        merged_hf, merged_fast = _both(peft, tok, "greedy", g=2, tokens=10, record=False)
    assert torch.equal(merged_fast.input_ids, live_fast.input_ids) and torch.equal(merged_hf.input_ids,
                                                                                     merged_fast.input_ids)
    # an optimizer step changes the adapters in place: the next call must use the new weights
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name:
                p.mul_(-1.5)
    step_hf, step_fast = _both(peft, tok, "greedy", g=2, tokens=10, record=False)
    assert torch.equal(step_hf.input_ids, step_fast.input_ids)
    assert not torch.equal(step_fast.input_ids, live_fast.input_ids)


def test_a_frozen_weight_changed_in_place_is_not_served_from_the_layout_cache():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = _both(model, tok, "greedy", g=2, tokens=10, record=False)[1]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(4.0)
        model.lm_head.weight.add_(0.05)
    hf, fast = _both(model, tok, "greedy", g=2, tokens=10, record=False)
    assert torch.equal(hf.input_ids, fast.input_ids) and not torch.equal(before.input_ids, fast.input_ids)


def test_auto_picks_fast_on_cpu_for_supported_models_and_hf_otherwise():
    for arch in ("llama", "qwen2", "qwen3"):
        assert resolve_engine("auto", tiny_model(arch)) == ("fast", "auto: CPU and a model the fast engine supports")
    mistral = tiny_model("mistral")  # its tiny config slides a 6-token window
    name, why = resolve_engine("auto", mistral)
    assert name == "hf" and "sliding-window" in why and unsupported_reason(mistral) is not None
    assert resolve_engine("hf", tiny_model("llama")) == ("hf", "set")
    assert SamplingConfig().engine == "auto"


def test_fast_on_a_model_it_cannot_run_is_refused_with_the_fix():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="engine = fast cannot run this model: sliding-window.*auto or hf"):
        generate(tiny_model("mistral"), tok, PROMPTS[:1], [None],
                 SamplingConfig(num_generations=2, max_new_tokens=4, engine="fast"))
    # auto on the same model runs hf and still generates
    out = generate(tiny_model("mistral"), tok, PROMPTS[:1], [None], SamplingConfig(num_generations=2, max_new_tokens=4))
    assert out.input_ids.shape[0] == 2


def test_the_default_inverse_cdf_draw_samples_the_models_distribution_from_another_stream():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = [tok(PROMPTS[0], add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        # a peaked distribution (the tiny model's is near uniform), so that a sampler at T = 1 instead of
        # 0.9 fails the test (chi-square 175 on 90 dof)
        model.lm_head.weight.mul_(10.0)
        probs = model(torch.tensor(ids)).logits[0, -1].double().div(0.9).softmax(-1)
    rows = 6000
    draws = {}
    for draw in ("auto", "multinomial"):
        torch.manual_seed(0)
        sampling = SamplingConfig(num_generations=rows, max_new_tokens=1, temperature=0.9, engine="fast", draw=draw)
        draws[draw] = ENGINES["fast"](model, tok, ids, rows, sampling)[0][:, 0]
    # both are samples of the first token's softmax (chi-square over the tokens expected >= 5 times, the
    # rest pooled); the default is a different stream, so the draws differ row by row
    for picks in draws.values():
        counts = torch.bincount(picks, minlength=probs.numel()).double()
        expected = probs * rows
        big = expected >= 5
        observed, wanted = counts[big], expected[big]
        if not big.all():
            observed = torch.cat([observed, counts[~big].sum()[None]])
            wanted = torch.cat([wanted, expected[~big].sum()[None]])
        chi2 = float(((observed - wanted) ** 2 / wanted).sum())
        dof = observed.numel() - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # five sd above the mean: an exact sampler passes
    assert float((draws["auto"] == draws["multinomial"]).float().mean()) < 0.9
    line = engine_line(model, SamplingConfig(temperature=0.9), SamplingConfig(temperature=0.9, draw="multinomial"))
    assert "engine fast (auto: CPU" in line and "draw inverse_cdf (auto)" in line and "draw multinomial" in line


def test_the_inverse_cdf_draw_on_an_hf_engine_is_refused_with_the_fix():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="draw = inverse_cdf is the fast engine's.*draw: auto or multinomial"):
        generate(tiny_model("llama"), tok, PROMPTS[:1], [None],
                 SamplingConfig(num_generations=2, max_new_tokens=4, engine="hf", draw="inverse_cdf"))
    with pytest.raises(ValueError, match="draw = 'gumbel': use one of auto, multinomial, inverse_cdf"):
        generate(tiny_model("llama"), tok, PROMPTS[:1], [None],
                 SamplingConfig(num_generations=2, max_new_tokens=4, draw="gumbel"))


@pytest.mark.parametrize("candidates,cost,expected", [
    (["linear", "wx", "packed"], {"linear": 1.0, "wx": 0.8, "packed": 1.0}, "packed"),  # 1.25x: noise here
    (["linear", "wx", "packed"], {"linear": 1.0, "wx": 0.6, "packed": 1.0}, "wx"),      # 1.67x: a real gap
    (["linear", "wx"], {"linear": 1.0, "wx": 0.7}, "linear"),                            # no MKL: linear is the default
    (["linear", "wx"], {"linear": 1.0, "wx": 0.5}, "wx"),
])
def test_pick_layout_leaves_the_default_only_for_a_layout_switch_margin_times_faster(monkeypatch, candidates,
                                                                                       cost, expected):
    from flowtracer.generation import fast
    clock = [0.0]
    monkeypatch.setattr(fast.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(fast, "_LAYOUTS", {})
    monkeypatch.setattr(fast, "_candidates", lambda dtype: candidates)
    monkeypatch.setattr(fast, "_prepare", lambda layout, w, rows: layout)
    monkeypatch.setattr(fast, "_product", lambda prepared, layout, rows: lambda x: clock.__setitem__(
        0, clock[0] + cost[layout]))
    assert fast.SWITCH_MARGIN == 1.5
    assert fast.pick_layout((16, 8), torch.float32, torch.device("cpu"), 4) == expected


@pytest.mark.parametrize("engine,draw,match", [
    ("hf", "inverse_cdf", r"model.sampling: sampling.draw = inverse_cdf is the fast engine.s.*auto or multinomial"),
    ("auto", "gumbel", r"model.sampling: sampling.draw = 'gumbel': use one of auto, multinomial, inverse_cdf"),
])
def test_preflight_refuses_a_draw_the_engine_would_refuse_in_one_line(engine, draw, match):
    from flowtracer.train.preflight import ConfigError, check_generation
    with pytest.raises(ConfigError, match=match) as e:
        check_generation("sampling", SamplingConfig(engine=engine, draw=draw))
    assert "\n" not in str(e.value)
    for ok in (SamplingConfig(), SamplingConfig(engine="fast", draw="inverse_cdf"),
               SamplingConfig(engine="hf", draw="multinomial")):
        check_generation("sampling", ok)  # accepted
