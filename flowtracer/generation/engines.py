"""The engine registry and the built-in engines (flowtracer.generation.chunks is the seam they plug into).

Each engine samples G responses for each prompt of one chunk and returns (new tokens (R, W) long,
padded with pad after EOS; stopped (R,) bool). To add one (e.g. an inference server), write a
function with the same signature, decorate it with `@register_engine("name")` and select it with
`sampling.engine: name`. `sampling.engine: auto` (the default) picks one per model and device
(`resolve_engine`). An engine that can report the sampler's log-prob of each token it drew
(for truncated importance sampling, flowtracer.generation.precision) accepts `record_logprobs=True`
and then returns a third item, (R, W) float32; it is only asked when a run needs them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList

from flowtracer.generation.cpu_linear import packed_linears
from flowtracer.generation.fast import decode, unsupported_reason
from flowtracer.generation.precision import LogprobRecorder
from flowtracer.generation.sampler import RowSeededSampler, resolve_draw

ENGINES: dict[str, Callable] = {}


def register_engine(name: str):
    """Decorator: make `fn` selectable as `sampling.engine: <name>`."""

    def deco(fn):
        ENGINES[name] = fn
        return fn

    return deco


AUTO = "auto"


def resolve_engine(name: str, model) -> tuple[str, str]:
    """(the engine `sampling.engine` = `name` runs on `model`, why). "auto": "fast" on a CPU for a
    model it supports (measured faster there, results/decode_*.md); "hf" otherwise, including CUDA,
    where the fast engine's gain is not measured yet."""
    if name != AUTO:
        return name, "set"
    device = next(model.parameters()).device.type
    reason = unsupported_reason(model)
    if reason is not None:
        return "hf", f"auto: the fast engine does not support this model ({reason})"
    if device != "cpu":
        return "hf", f"auto: on {device} the fast engine is not measured yet"
    return "fast", "auto: CPU and a model the fast engine supports"


def engine_line(model, sampling, val_sampling=None) -> str:
    """The start-up line that names the engines a run's rollouts and validation use, and why."""
    name, why = resolve_engine(sampling.engine, model)
    line = f"[flowtracer] generation: engine {name} ({why}), {_draw_words(sampling, name)}"
    if val_sampling is not None and (val_sampling.engine, val_sampling.draw) != (sampling.engine, sampling.draw):
        vname, vwhy = resolve_engine(val_sampling.engine, model)
        line += f"; validation engine {vname} ({vwhy}), {_draw_words(val_sampling, vname)}"
    return line


def _draw_words(sampling, engine: str) -> str:
    if sampling.temperature <= 0:
        return "greedy"
    if sampling.seed_per_prompt:
        return "per-row seeded draw"
    draw = resolve_draw(sampling.draw, engine)
    return f"draw {draw}" + (" (auto)" if sampling.draw == "auto" else "")


def eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def left_pad(ids: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    """(P, width) ids and attention mask of token lists, left-padded."""
    width = max(map(len, ids))
    out = torch.full((len(ids), width), pad, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, width - len(x):], attn[i, width - len(x):] = torch.tensor(x, dtype=torch.long), 1
    return out.to(device), attn.to(device)


def _hf_generate(model, tokenizer, ids, g: int, sampling, row_seeds, cache: str | None, share: bool,
                 record: bool = False):
    resolve_draw(sampling.draw, "hf")  # refuses inverse_cdf: generate draws with torch.multinomial
    device = next(model.parameters()).device
    p_ids, p_attn = left_pad(ids, tokenizer.pad_token_id, device)
    prompt_ids, prompt_attn = p_ids.repeat_interleave(g, 0), p_attn.repeat_interleave(g, 0)
    greedy = sampling.temperature <= 0
    extra = {}
    # User processors run before generate's temperature / top-k / top-p warpers: the recorder
    # sees the raw float32 logits, and comes before the seeded sampler that perturbs them.
    recorder = LogprobRecorder(sampling.temperature) if record else None
    processors = [recorder] if recorder is not None else []
    if row_seeds is not None and not greedy:
        # greedy decoding over Gumbel-perturbed logits = a per-row seeded sample
        processors.append(RowSeededSampler(
            row_seeds, prompt_ids.shape[1], sampling.temperature, sampling.top_k, sampling.top_p))
        greedy = True
    if processors:
        extra["logits_processor"] = LogitsProcessorList(processors)
    if share and g > 1 and p_ids.shape[1] > 1 and cache in (None, "dynamic"):
        extra[_cache_kwarg(model)] = _shared_prefill(model, p_ids, p_attn, g)
    # Every decode step feeds each linear layer exactly len(prompt_ids) rows (finished rows keep going).
    with packed_linears(model, prompt_ids.shape[0], sampling.cpu_packed_linear):
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_attn, max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else (sampling.top_k or None),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            cache_implementation=cache, **extra)
    new = out[:, prompt_ids.shape[1]:]
    stopped = torch.isin(new, torch.tensor(eos_ids(tokenizer, model), device=new.device)).any(1)
    return (new, stopped) if recorder is None else (new, stopped, recorder.result(new))


@register_engine("hf")
def hf_engine(model, tokenizer, ids, g, sampling, row_seeds=None, record_logprobs=False):
    """`model.generate` with `sampling.cache_implementation` (None = dynamic cache)."""
    return _hf_generate(model, tokenizer, ids, g, sampling, row_seeds, sampling.cache_implementation,
                        sampling.share_prompt_prefill, record_logprobs)


@register_engine("fast")
def fast_engine(model, tokenizer, ids, g, sampling, row_seeds=None, record_logprobs=False):
    """Our own decode loop over a static KV cache (flowtracer.generation.fast), Llama-shaped models."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"sampling.engine = fast cannot run this model: {reason}; use engine auto or hf")
    p_ids, p_attn = left_pad(ids, tokenizer.pad_token_id, next(model.parameters()).device)
    return decode(model, p_ids, p_attn, g, sampling, eos_ids(tokenizer, model), tokenizer.pad_token_id,
                  row_seeds, record_logprobs)


@register_engine("hf_static")
def hf_static_engine(model, tokenizer, ids, g, sampling, row_seeds=None, record_logprobs=False):
    """Static KV cache; transformers compiles the decoding step on CUDA (recompiles per new shape)."""
    return _hf_generate(model, tokenizer, ids, g, sampling, row_seeds, "static", False, record_logprobs)


@register_engine("hf_paged")
def hf_paged_engine(model, tokenizer, ids, g, sampling, row_seeds=None, record_logprobs=False):
    """Continuous batching (`generate_batch`): a finished row frees its slot at once."""
    if record_logprobs:
        raise ValueError("sampling.engine = hf_paged cannot report the sampler's log-probs that correct a "
                         "sampler/learner precision mismatch; set sampling.dtype to the training precision "
                         "or use engine hf")
    resolve_draw(sampling.draw, "hf_paged")
    if row_seeds is not None:
        raise ValueError("sampling.engine = hf_paged samples with transformers' own sampler; "
                         "set sampling.seed_per_prompt: false or use engine hf")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    greedy = sampling.temperature <= 0
    cfg = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else (sampling.top_k or None), eos_token_id=eos_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id)
    inputs = [x for x in ids for _ in range(g)]
    results = base.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False)
    ordered = [results[k] for k in sorted(results, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    bad = [r.error for r in ordered if r.error]
    if len(ordered) != len(inputs) or bad:
        raise RuntimeError(f"generate_batch returned {len(ordered)} of {len(inputs)} rows ({bad[:1]}); "
                           "use sampling.engine: hf")
    width = max(1, max(len(r.generated_tokens) for r in ordered))
    new = torch.full((len(ordered), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(ordered):
        new[i, :len(r.generated_tokens)] = torch.tensor(r.generated_tokens, dtype=torch.long)
    eos = torch.tensor(eos_ids(tokenizer, model))
    return new, torch.isin(new, eos).any(1)


def _shared_prefill(model, prompt_ids: Tensor, prompt_attn: Tensor, g: int):
    """KV cache of each prompt but its last token, computed once and repeated for its G rows.

    `generate` then runs only the last prompt token and the new ones. Position ids follow the
    attention mask exactly as `generate` derives them, so left padding lines up.
    """
    pos = (prompt_attn.long().cumsum(-1) - 1).masked_fill(prompt_attn == 0, 0)
    out = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_attn[:, :-1], position_ids=pos[:, :-1],
                use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
    cache.batch_repeat_interleave(g)
    return cache


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version has."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
