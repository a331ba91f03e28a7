"""The RolloutBatch: everything one RL step knows about its sampled responses.

Layout of every (B, T) tensor: the prompt is left-padded and the response right-padded, so that
`input_ids[b] = [pad .. pad, prompt tokens, response tokens, pad .. pad]`. Rollout callbacks (the
credit arms) read this object and write `token_weights` and `metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) bool/long: 1 on real tokens (prompt and response)
    prompt_mask: Tensor  # (B, T) bool: real prompt tokens
    response_mask: Tensor  # (B, T) bool: generated tokens up to and including EOS
    question_mask: Tensor  # (B, T) bool: the user question inside the prompt (flow source)
    answer_mask: Tensor  # (B, T) bool: the final-answer span the verifier parsed (flow sink)
    rewards: Tensor  # (B,) float32
    advantages: Tensor  # (B,) float32, group-normalised
    group_ids: Tensor  # (B,) long: responses to the same prompt share an id
    prompts: list[str] = field(default_factory=list)  # decoded prompt text per row
    responses: list[str] = field(default_factory=list)  # decoded response text per row
    answers: list[str] = field(default_factory=list)  # reference answers per row
    old_logprobs: Tensor | None = None  # (B, T) float32, log p_old(token t | < t); 0 off-response
    entropies: Tensor | None = None  # (B, T) float32, entropy of the distribution predicting t
    attn: Tensor | None = None  # (B, T, T) float32 middle-layer head-averaged attention, if captured
    token_weights: Tensor | None = None  # (B, T) float32, set by a credit arm; None = all ones
    metrics: dict[str, float] = field(default_factory=dict)  # stats a callback wants logged

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def weights_or_ones(self) -> Tensor:
        """The per-token weights to use in the loss (ones where no arm set any)."""
        if self.token_weights is not None:
            return self.token_weights
        return self.response_mask.to(torch.float32)

    def inputs_of(self, idx: Tensor, cols: slice = slice(None)) -> "RolloutBatch":
        """Rows `idx` restricted to columns `cols`, as a new batch of copies holding only the inputs.

        Every output field (old log-probs, entropies, attn, token weights) is None and `metrics` is
        empty: what a micro-batch's credit arms see is filled from that micro-batch's own forward.
        """
        picked = idx.tolist()
        out = {}
        for f in fields(self):
            if f.name in OUTPUT_FIELDS or f.name == "metrics":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[idx]
                out[f.name] = value[:, cols] if value.dim() >= 2 else value
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in picked]
        return RolloutBatch(**out)


# Filled per step or per micro-batch by forwards and credit arms (never copied into a micro-batch).
OUTPUT_FIELDS = ("old_logprobs", "entropies", "attn", "token_weights")


@dataclass
class SamplingConfig:
    """How responses are sampled (HF generate with the KV cache).

    Args:
        num_generations: responses per prompt (G, the GRPO group size; >= 2).
        max_new_tokens: cap on response length in tokens.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass (1.0 = off).
        top_k: sample among the k most likely tokens (0 = off).
        seed_per_prompt: draw every response from its own seed (run seed, step, prompt position,
            sample index) instead of one RNG stream for the batch, so rollouts do not depend on
            how prompts are batched or split over processes: a DDP run then equals a 1-process
            run (see flowtracer.sampling). Off by default (HF's sampler, the original runs).
        cache_implementation: HF generate's KV cache: None = dynamic (grows per token), "static"
            (preallocated; on CUDA transformers then compiles the decoding step once, which pays
            off on long runs of same-shaped batches; on CPU it stays eager and is no faster, see
            benchmarks/generate_bench.py).
        share_prompt_prefill: run each prompt's prefill once and copy its KV cache to its G rows,
            instead of prefilling the same prompt G times (quickstart prompts, G=8, CPU: generation
            9.3 s -> 8.4 s). Same cache up to float rounding; dynamic cache only.
    """

    num_generations: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed_per_prompt: bool = False
    cache_implementation: str | None = None
    share_prompt_prefill: bool = True


@dataclass
class Generated:
    """Raw output of `generate`: token layout and decoded text, before scoring."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) long
    prompt_mask: Tensor  # (B, T) bool
    response_mask: Tensor  # (B, T) bool
    question_mask: Tensor  # (B, T) bool
    responses: list[str]
    truncated: Tensor  # (B,) bool: hit max_new_tokens without EOS
    prompt_len: int  # responses start at this column


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], question_spans: list[tuple[int, int] | None],
             sampling: SamplingConfig, *, num_generations: int | None = None,
             row_seeds: Tensor | None = None) -> Generated:
    """Sample `num_generations` responses for each prompt in one batched `generate` call.

    Rows are grouped: rows [i*G, (i+1)*G) answer prompt i. The question mask marks the prompt tokens
    that overlap the question's character span (all prompt tokens where the span is unknown).
    `row_seeds` (B * G,) switches to per-row seeded sampling (flowtracer.sampling).
    """
    g = num_generations or sampling.num_generations
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    return_offsets_mapping=True)
    device = next(model.parameters()).device
    prompt_ids = enc["input_ids"].repeat_interleave(g, dim=0).to(device)
    prompt_attn = enc["attention_mask"].repeat_interleave(g, dim=0).to(device)
    greedy = sampling.temperature <= 0
    extra = {}
    if row_seeds is not None and not greedy:
        from transformers import LogitsProcessorList

        from flowtracer.sampling import RowSeededSampler

        # greedy decoding over Gumbel-perturbed logits = a per-row seeded sample
        extra["logits_processor"] = LogitsProcessorList([RowSeededSampler(
            row_seeds, prompt_ids.shape[1], sampling.temperature, sampling.top_k, sampling.top_p)])
        greedy = True
    if (sampling.share_prompt_prefill and g > 1 and prompt_ids.shape[1] > 1
            and sampling.cache_implementation in (None, "dynamic")):
        extra[_cache_kwarg(model)] = _shared_prefill(
            model, enc["input_ids"].to(device), enc["attention_mask"].to(device), g)
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_attn, max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy, temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p, top_k=None if greedy else (sampling.top_k or None),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
        cache_implementation=sampling.cache_implementation, **extra,
    )
    plen = prompt_ids.shape[1]
    new = out[:, plen:]
    eos_ids = _eos_ids(tokenizer, model)
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    # Response = tokens up to and including the first EOS; everything after is padding.
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    response_mask = ~after_eos
    truncated = ~is_eos.any(1)
    # Trim columns that are padding in every row (all sequences stopped early).
    width = int(response_mask.sum(1).max().item()) if new.shape[1] else 0
    new, response_mask = new[:, :width], response_mask[:, :width]
    new = new.masked_fill(~response_mask, tokenizer.pad_token_id)

    input_ids = torch.cat([prompt_ids, new], 1)
    prompt_mask = torch.cat([prompt_attn.bool(), torch.zeros_like(response_mask)], 1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_attn, dtype=torch.bool), response_mask], 1)
    attention_mask = (prompt_mask | full_response_mask).long()

    question = question_token_mask(enc["offset_mapping"], enc["attention_mask"], question_spans)
    question_mask = torch.cat([question.repeat_interleave(g, 0).to(device),
                               torch.zeros_like(response_mask)], 1)
    texts = tokenizer.batch_decode(new.masked_fill(is_eos[:, :width], tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return Generated(input_ids, attention_mask, prompt_mask, full_response_mask, question_mask,
                     texts, truncated, plen)


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
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def question_token_mask(offsets: Tensor, attn: Tensor, spans: list[tuple[int, int] | None]) -> Tensor:
    """(P, Tp) bool: prompt tokens overlapping the question span; all real tokens if no span."""
    starts, ends = offsets[..., 0], offsets[..., 1]
    s = torch.tensor([sp[0] if sp else -1 for sp in spans]).unsqueeze(1)
    e = torch.tensor([sp[1] if sp else -1 for sp in spans]).unsqueeze(1)
    overlap = (starts < e) & (ends > s) & (ends > starts)
    no_span = (s < 0).expand_as(overlap)
    return torch.where(no_span, attn.bool(), overlap & attn.bool())


def response_token_offsets(tokenizer, token_ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each response token inside the decoded `text`.

    Fast path: re-tokenising the text usually reproduces the sampled ids, and then the tokenizer's
    own offsets are exact. Otherwise fall back to decoding growing prefixes (exact, slower).
    Special tokens (EOS) get the empty span (len(text), len(text)).
    """
    special = set(tokenizer.all_special_ids)
    body = [t for t in token_ids if t not in special]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == body:
        body_offsets = [tuple(o) for o in enc["offset_mapping"]]
    else:
        prefixes = tokenizer.batch_decode([body[: j + 1] for j in range(len(body))],
                                          skip_special_tokens=True)
        ends = [len(p) for p in prefixes]
        body_offsets = list(zip([0] + ends[:-1], ends))
    it = iter(body_offsets)
    return [(len(text), len(text)) if t in special else next(it) for t in token_ids]
