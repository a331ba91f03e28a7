"""The RolloutBatch: everything one RL step knows about its sampled responses.

Layout of every (B, T) tensor: the prompt is left-padded and the response right-padded, so that
`input_ids[b] = [pad .. pad, prompt tokens, response tokens, pad .. pad]`. Rollout callbacks (the
credit arms) read this object and write `token_weights` and `metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from flowtracer.generation import Generated, generate_rollouts


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
    """How responses are sampled (see flowtracer.generation: chunks, engines).

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
        cache_implementation: HF generate's KV cache for engine "hf": None = dynamic (grows per
            token), "static" (preallocated; on CUDA transformers then compiles the decoding step
            once, which pays off on long runs of same-shaped batches; on CPU it stays eager and is
            no faster, see benchmarks/generate_bench.py).
        share_prompt_prefill: run each prompt's prefill once and copy its KV cache to its G rows,
            instead of prefilling the same prompt G times (quickstart prompts, G=8, CPU: generation
            9.3 s -> 8.4 s). Same cache up to float rounding; dynamic cache only.
        generation_batch_size: rows (responses) per generate call, in whole prompt groups:
            0 = all rows of the step in one call (default), N > 0 = at most N rows (at least one
            prompt's G rows), "auto" = the largest count whose KV cache fits the memory the
            planner leaves free (flowtracer.planner). Prompts are sorted by length first; results
            come back in the original order, identical for greedy and seed_per_prompt sampling.
        generation_token_budget: also cap rows x (prompt + max_new_tokens) tokens per call
            (0 = off); bounds the KV cache when prompt lengths vary.
        cpu_packed_linear: on CPU in float32, decode with MKL-packed weights (flowtracer.cpu_linear):
            the same linear layers through a faster GEMM for the decode batch's row count (SmolLM2,
            8 rows x 48 tokens: 6.6 s -> 5.1 s of generation), equal up to float rounding; the packed
            copies take about twice the linear weights' memory. No effect on GPU or without MKL.
        engine: the generation engine (flowtracer.generation.ENGINES): "hf" (model.generate,
            default), "hf_static" (static cache + compiled decoding, CUDA), "hf_paged" (continuous
            batching with paged attention, CUDA; no seed_per_prompt).
    """

    num_generations: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed_per_prompt: bool = False
    cache_implementation: str | None = None
    share_prompt_prefill: bool = True
    generation_batch_size: int | str = 0
    generation_token_budget: int = 0
    cpu_packed_linear: bool = True
    engine: str = "hf"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], question_spans: list[tuple[int, int] | None],
             sampling: SamplingConfig, *, row_seeds: Tensor | None = None) -> Generated:
    """Sample `sampling.num_generations` responses for each prompt (flowtracer.generation).

    Rows are grouped: rows [i*G, (i+1)*G) answer prompt i. The question mask marks the prompt tokens
    that overlap the question's character span (all prompt tokens where the span is unknown).
    `row_seeds` (B * G,) switches to per-row seeded sampling (flowtracer.sampling). Generation runs
    in chunks of `sampling.generation_batch_size` rows; the layout is one left-padded prompt block
    of width `prompt_len` followed by the right-padded responses.
    """
    return generate_rollouts(model, tokenizer, prompts, question_spans, sampling, row_seeds=row_seeds)


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


def sample(policy, tokenizer, prompts: list[str], question_spans: list[tuple[int, int] | None],
           sampling: SamplingConfig, *, row_seeds: Tensor | None = None) -> Generated:
    """`generate` from a policy in training: eval mode and LoRA merged exactly into the base weights
    for the call (one GEMM per adapted layer and token, not three), both restored afterwards.

    Decoding runs under `torch.inference_mode` (no autograd bookkeeping per decode step: ~2% faster
    than no_grad on CPU, 1 x 8 x 48 tokens of SmolLM2); the returned tensors are cloned out of it,
    so the training forward can use them as ordinary tensors.
    """
    from flowtracer.policy import merged_lora

    was_training = policy.training
    policy.eval()
    try:
        with merged_lora(policy):
            with torch.inference_mode():
                gen = generate(policy, tokenizer, prompts, question_spans, sampling, row_seeds=row_seeds)
    finally:
        policy.train(was_training)
    for f in fields(gen):
        value = getattr(gen, f.name)
        if isinstance(value, Tensor):
            setattr(gen, f.name, value.clone())
    return gen
