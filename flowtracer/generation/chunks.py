"""Rollout generation: memory-bounded chunks, prompts sorted by length, engines behind one seam.

`generate(model, tokenizer, prompts, spans, sampling, row_seeds)`:
  1. the step's prompts are sorted by token length (stable) and cut into chunks of whole prompt
     groups (G rows each) of at most `sampling.generation_batch_size` rows and, if set,
     `sampling.generation_token_budget` rows x (chunk prompt width + max_new_tokens) tokens, so the
     KV cache of one `generate` call is bounded and a chunk's prompts need little left padding;
  2. each chunk goes through the engine `sampling.engine` (one entry of ENGINES);
  3. the chunks are re-padded to one layout (prompt left-padded to the widest prompt of the step,
     response right-padded to the longest response) and put back in the original row order.
Greedy and per-row-seeded sampling (flowtracer.generation.sampler) depend only on a row's own logits, so the
result equals one big call (tests/test_generation.py); with HF's batch sampler the draws differ.
(With `sampling.cpu_packed_linear` on a CPU the GEMM kernel depends on a chunk's row count, so the
logits, and a token drawn within float rounding of a tie, may differ between chunk sizes.)

The engine seam: an engine is `fn(model, tokenizer, prompt_ids: list[list[int]], g, sampling,
row_seeds) -> (new_tokens (R, W) long, stopped (R,) bool)` for the R = len(prompt_ids) * g rows of
one chunk (rows [i*g, (i+1)*g) answer prompt i), registered with `@register_engine("name")`.
Everything else (masks, EOS handling, text, re-padding) is shared. `sampling.engine: auto` (the
default) resolves to "fast" on a CPU for the models it supports, else "hf" (engines.resolve_engine).
Engines here:
  * "fast": our own decode loop over a static KV cache (flowtracer.generation.fast): fused
    products in a layout fast for skinny inputs, no `generate` machinery; Llama-shaped models.
  * "hf": `model.generate` with the cache `sampling.cache_implementation` (dynamic by default);
    prefill shared across a prompt's G rows (`share_prompt_prefill`).
  * "hf_static": static KV cache; on CUDA transformers compiles the decoding step (one compile
    per chunk shape: use fixed-size chunks). No gain on CPU.
  * "hf_paged": transformers' continuous batching (`generate_batch`, paged attention): finished
    rows leave the batch at once instead of idling until the longest row ends. CUDA only; it uses
    its own sampler, so `seed_per_prompt` is not supported there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.batch import Generated
from flowtracer.generation.engines import AUTO, ENGINES, eos_ids, resolve_engine
from flowtracer.memory.planner import auto_generation_rows


def chunk_prompts(lengths: list[int], g: int, max_new_tokens: int, max_rows: int = 0,
                  token_budget: int = 0) -> list[list[int]]:
    """Prompt indices per chunk: sorted by length, each chunk within the row and token limits.

    A chunk holds whole prompts (its G rows), at least one, so the shared prefill still applies.
    `max_rows` <= 0 and `token_budget` <= 0 mean no limit.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        rows = (len(cur) + 1) * g if cur else 0
        tokens = rows * (lengths[i] + max_new_tokens)  # sorted: prompt i is the chunk's widest
        fits = cur is not None and (max_rows <= 0 or rows <= max_rows) and (token_budget <= 0 or tokens <= token_budget)
        if fits:
            cur.append(i)
        else:
            chunks.append([i])
    return chunks


def resolve_rows(sampling, model, n_rows: int, prompt_width: int) -> int:
    """`sampling.generation_batch_size` as a row count: 0 = all rows, "auto" = the planner's choice."""
    size = sampling.generation_batch_size
    if isinstance(size, str):
        return auto_generation_rows(model, prompt_width + sampling.max_new_tokens, n_rows)
    return int(size) if size and int(size) > 0 else n_rows


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], question_spans: list[tuple[int, int] | None],
             sampling, *, row_seeds: Tensor | None = None, record_logprobs: bool = False) -> Generated:
    """Sample `sampling.num_generations` responses for each prompt, chunk by chunk.

    Rows are grouped: rows [i*G, (i+1)*G) answer prompt i. The question mask marks the prompt tokens
    that overlap the question's character span (all prompt tokens where the span is unknown).
    `row_seeds` (B * G,) switches to per-row seeded sampling (flowtracer.generation.sampler). The
    layout is one left-padded prompt block of width `prompt_len` followed by the right-padded responses.
    `record_logprobs`: also return the sampler's log-prob of each response token
    (`Generated.sampler_logprobs`; flowtracer.generation.precision).
    """
    engine = ENGINES.get(resolve_engine(sampling.engine, model)[0])
    if engine is None:
        raise ValueError(f"sampling.engine = {sampling.engine!r}: use one of {AUTO}, {', '.join(ENGINES)}")
    g = sampling.num_generations
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    rows = resolve_rows(sampling, model, len(prompts) * g, max(map(len, ids)) if ids else 0)
    chunks = chunk_prompts([len(x) for x in ids], g, sampling.max_new_tokens, rows,
                           getattr(sampling, "generation_token_budget", 0))
    device = next(model.parameters()).device
    news, stops, lps = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    extra = {"record_logprobs": True} if record_logprobs else {}
    for chunk in chunks:
        seeds = None
        if row_seeds is not None:
            pick = torch.tensor([i * g + k for i in chunk for k in range(g)], device=row_seeds.device)
            seeds = row_seeds[pick]
        new, stopped, *lp = engine(model, tokenizer, [ids[i] for i in chunk], g, sampling, seeds, **extra)
        for j, i in enumerate(chunk):
            news[i], stops[i] = new[j * g:(j + 1) * g], stopped[j * g:(j + 1) * g]
            lps[i] = lp[0][j * g:(j + 1) * g] if lp else None
    gen = _assemble(tokenizer, model, ids, enc["offset_mapping"], question_spans, news, g, device)
    gen.prompts = [p for p in prompts for _ in range(g)]
    if record_logprobs:
        gen.sampler_logprobs = _response_layout(lps, gen, g)
    return gen


def _response_layout(parts: list[Tensor], gen: Generated, g: int) -> Tensor:
    """(B, T) float32: each prompt's (G, W_i) response values placed at the response columns,
    zero on prompt and padding."""
    out = torch.zeros(gen.input_ids.shape, dtype=torch.float32, device=gen.input_ids.device)
    w = gen.input_ids.shape[1] - gen.prompt_len
    for i, part in enumerate(parts):
        n = min(part.shape[1], w)
        out[i * g:(i + 1) * g, gen.prompt_len:gen.prompt_len + n] = part[:, :n].to(out.device)
    return out.masked_fill_(~gen.response_mask, 0.0)


def _assemble(tokenizer, model, ids, offsets, spans, news, g: int, device) -> Generated:
    """One layout for all rows: prompts left-padded to the widest, responses right-padded."""
    pad = tokenizer.pad_token_id
    width = max(map(len, ids))
    prompt_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    prompt_attn = torch.zeros((len(ids), width), dtype=torch.long)
    offs = torch.zeros((len(ids), width, 2), dtype=torch.long)
    for i, (x, o) in enumerate(zip(ids, offsets)):
        if x:
            prompt_ids[i, width - len(x):], prompt_attn[i, width - len(x):] = torch.tensor(x), 1
            offs[i, width - len(x):] = torch.tensor(o, dtype=torch.long)
    resp_w = max((n.shape[1] for n in news), default=0)
    new = torch.full((len(ids) * g, resp_w), pad, dtype=torch.long, device=device)
    for i, n in enumerate(news):
        new[i * g:(i + 1) * g, :n.shape[1]] = n.to(device)
    eos = torch.tensor(eos_ids(tokenizer, model), device=device)
    is_eos = torch.isin(new, eos)
    # response = tokens up to and including the first EOS; everything after is padding
    # (engines pad finished rows after their EOS; a row without EOS ran to max_new_tokens)
    response_mask = ~((is_eos.cumsum(1) - is_eos.long()) > 0)
    truncated = ~is_eos.any(1)
    w = int(response_mask.sum(1).max().item()) if resp_w else 0  # drop all-padding columns
    new, response_mask, is_eos = new[:, :w], response_mask[:, :w], is_eos[:, :w]
    new = new.masked_fill(~response_mask, pad)
    p_ids = prompt_ids.repeat_interleave(g, 0).to(device)
    p_attn = prompt_attn.repeat_interleave(g, 0).to(device)
    prompt_mask = torch.cat([p_attn.bool(), torch.zeros_like(response_mask)], 1)
    full_resp = torch.cat([torch.zeros_like(p_attn, dtype=torch.bool), response_mask], 1)
    question = question_mask(offs, prompt_attn, spans).repeat_interleave(g, 0).to(device)
    texts = tokenizer.batch_decode(new.masked_fill(is_eos, pad), skip_special_tokens=True)
    return Generated(torch.cat([p_ids, new], 1), (prompt_mask | full_resp).long(), prompt_mask, full_resp,
                     torch.cat([question, torch.zeros_like(response_mask)], 1), texts, truncated, width)


def question_mask(offsets: Tensor, attn: Tensor, spans: list[tuple[int, int] | None]) -> Tensor:
    """(P, Tp) bool: prompt tokens overlapping the question span; all real tokens if no span."""
    starts, ends = offsets[..., 0], offsets[..., 1]
    s = torch.tensor([sp[0] if sp else -1 for sp in spans]).unsqueeze(1)
    e = torch.tensor([sp[1] if sp else -1 for sp in spans]).unsqueeze(1)
    overlap = (starts < e) & (ends > s) & (ends > starts)
    no_span = (s < 0).expand_as(overlap)
    return torch.where(no_span, attn.bool(), overlap & attn.bool())

