"""Generation: chunked, memory-bounded `generate`; engines behind a registry; the per-row seeded
sampler; MKL-packed CPU linears for decoding; `sample` for a policy in training.

chunks.py      generate(): prompts sorted by length, chunks of whole prompt groups, one layout back
engines.py     ENGINES / register_engine, resolve_engine ("auto"), eos_ids, the fast / hf / hf_static / hf_paged engines
fast.py        the fast engine: our own decode loop over a static KV cache (Llama-shaped models)
sampler.py     per-row seeded Gumbel-max sampling (sampling.seed_per_prompt); the unseeded draw (sampling.draw)
cpu_linear.py  packed_linears(): MKL-packed weights for the decode rows on CPU
rollout.py     sample() (eval mode, LoRA merged) and response_token_offsets()
"""

from flowtracer.generation.chunks import generate, question_mask
from flowtracer.generation.engines import AUTO, ENGINES, engine_line, eos_ids, register_engine, resolve_engine
from flowtracer.generation.rollout import response_token_offsets, sample
from flowtracer.generation.sampler import row_seeds

__all__ = ["AUTO", "ENGINES", "engine_line", "eos_ids", "resolve_engine",
           "generate", "question_mask", "register_engine", "response_token_offsets",
           "row_seeds", "sample"]
