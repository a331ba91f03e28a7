"""Planner accuracy on CPU: predicted vs measured peak memory per phase. Prints a table.

    OMP_NUM_THREADS=2 python benchmarks/plan_accuracy.py [--cases smollm2,smollm2-bf16,tiny-lora,tiny-full]

For each case the model is built (the bundled SmolLM2-135M-Instruct, or a random tiny Qwen3 with
the test tokenizer) and three phases run as the trainer runs them: `generate` (responses forced to
max_new_tokens so the KV cache reaches its planned size), one training micro-batch (teacher-forced
forward with gradient and attention capture, PPO loss, backward, AdamW step; measured on the
second step so the optimizer states exist), and the flow solve of that micro-batch's map.
Measured = the process's peak RSS during the phase minus the RSS before the model was built
(flowtracer.memory.measure; after a warm-up on a throwaway model so library code and thread pools are
already resident), i.e. weights + optimizer states + the phase's transients, as planned. Large
allocations go straight to mmap (MALLOC_MMAP_THRESHOLD_, set below for the case processes) so
RSS follows live tensors rather than glibc's heap fragmentation.
"""

from __future__ import annotations

import argparse
import time

import torch

from flowtracer.memory.measure import measure_peak
from flowtracer.memory.planner import RunSpec, plan, shape_from_config

CASES = {  # name -> (model, RunSpec overrides)
    "smollm2": ("smollm2-135m-instruct", dict(rollouts=32, num_generations=8, max_new_tokens=128,
                                              micro_batch_size=8, lora_r=16, gradient_checkpointing=False,
                                              generation_batch_size=16)),
    "smollm2-ckpt": ("smollm2-135m-instruct", dict(rollouts=32, num_generations=8, max_new_tokens=192,
                                                   micro_batch_size=16, lora_r=16, gradient_checkpointing=True,
                                                   generation_batch_size=32)),
    # bf16-mixed training (autocast over float32 weights) with bf16 rollouts and the sampler's log-probs
    "smollm2-bf16": ("smollm2-135m-instruct", dict(rollouts=32, num_generations=8, max_new_tokens=128,
                                                   micro_batch_size=8, lora_r=16, gradient_checkpointing=False,
                                                   generation_batch_size=16, sampler_dtype="bfloat16",
                                                   autocast=True)),
    "tiny-lora": ("tiny", dict(rollouts=64, num_generations=8, max_new_tokens=160, micro_batch_size=16,
                               lora_r=8, gradient_checkpointing=False, generation_batch_size=64)),
    "tiny-full": ("tiny", dict(rollouts=32, num_generations=8, max_new_tokens=160, micro_batch_size=16,
                               lora_r=None, gradient_checkpointing=True, generation_batch_size=16)),
}


def build(name: str, lora_r: int | None, ckpt: bool):
    """(policy, tokenizer): the bundled model, or a tiny random Qwen3 saved and loaded like one."""
    import sys
    import tempfile
    from pathlib import Path

    from flowtracer.config import LoraSpec
    from flowtracer.model.policy import load_policy

    lora = LoraSpec(r=lora_r, alpha=2 * lora_r) if lora_r else None
    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        folder = tempfile.mkdtemp()
        tiny_model("qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   max_position_embeddings=1024).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        name = folder
    return load_policy(name, lora=lora, gradient_checkpointing=ckpt)


def _fixed_length_engine(model, tokenizer, ids, g, sampling, row_seeds=None, record_logprobs=False):
    """HF generate with every response forced to max_new_tokens (the planned worst case)."""
    from transformers import LogitsProcessorList

    from flowtracer.generation.engines import left_pad
    from flowtracer.generation.precision import LogprobRecorder

    p, a = left_pad(ids, tokenizer.pad_token_id, "cpu")
    rec = LogprobRecorder(1.0) if record_logprobs else None
    out = model.generate(input_ids=p.repeat_interleave(g, 0), attention_mask=a.repeat_interleave(g, 0),
                         max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.max_new_tokens,
                         do_sample=True, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=LogitsProcessorList([rec] if rec else []))
    new = out[:, p.shape[1]:]
    stopped = torch.zeros(new.shape[0], dtype=torch.bool)
    return (new, stopped) if rec is None else (new, stopped, rec.result(new))


def warm_up(arch: str) -> None:
    """Run every phase once on a throwaway 2-layer model, so library code, kernels and thread
    pools are loaded before the baseline: measured = tensors of the case, not import overhead."""
    import sys
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from flowtracer.flow import trace_flow
    from flowtracer.model.forward import teacher_forced_pass

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(arch, num_hidden_layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    enc = tok(["warm up", "a"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=True, pad_token_id=0)
    mask = torch.ones_like(out, dtype=torch.bool)
    res = teacher_forced_pass(model, out, mask.long(), capture_layers="middle", with_grad=True, stats_mask=mask)
    res.logprobs.sum().backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).step()
    trace_flow(res.attn, mask, mask & (torch.arange(out.shape[1]) == out.shape[1] - 1), valid_mask=mask)


def _train_step(policy, opt, ids, attn, resp, run):
    """One micro-batch update as the trainer runs it; returns the captured attention map."""
    from flowtracer.model.forward import teacher_forced_pass
    from flowtracer.rl import policy_loss

    opt.zero_grad(set_to_none=True)
    # Lightning's bf16-mixed: autocast around the forward, no cast cache
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.autocast, cache_enabled=False):
        out = teacher_forced_pass(policy, ids, attn, capture_layers="middle", with_grad=True, stats_mask=resp,
                                  logits_chunk_bytes=int(run.logits_budget_mb * 2**20))
    loss, _ = policy_loss(out.logprobs, out.logprobs.detach(), torch.randn(ids.shape[0]), resp)
    loss.backward()
    opt.step()
    return out.attn


def run_case(name: str, model_name: str, over: dict) -> list[tuple]:
    from flowtracer.config import SamplingConfig
    from flowtracer.flow import trace_flow
    from flowtracer.generation import generate, register_engine
    from flowtracer.generation.precision import rollout_dtype
    from flowtracer.model.policy import merged_lora

    register_engine("bench_fixed_length")(_fixed_length_engine)
    warm_up("llama" if model_name != "tiny" else "qwen3")
    with measure_peak() as base:
        pass
    baseline = base.start
    policy, tok = build(model_name, over["lora_r"], over["gradient_checkpointing"])
    g, n = over["num_generations"], over["rollouts"] // over["num_generations"]
    prompts = [f"Question {i}: what is {i} + {2 * i}? Think step by step about it." for i in range(n)]
    prompt_tokens = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    run = RunSpec(prompt_tokens=prompt_tokens, dtype="float32", accelerator="cpu", **over)
    shape = shape_from_config(policy.config)
    sampling = SamplingConfig(num_generations=g, max_new_tokens=run.max_new_tokens, engine="bench_fixed_length",
                              generation_batch_size=run.generation_batch_size)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    m = run.micro
    warm_ids = torch.randint(3, shape.vocab, (m, run.seq))
    warm_resp = torch.zeros_like(warm_ids, dtype=torch.bool)
    warm_resp[:, run.prompt_tokens:] = True
    _train_step(policy, opt, warm_ids, torch.ones_like(warm_ids), warm_resp, run)  # AdamW states + grads exist
    policy.eval()
    low = getattr(torch, run.sampler) if run.recasts else None
    with measure_peak() as pk, merged_lora(policy), rollout_dtype(policy, low):
        gen = generate(policy, tok, prompts, [None] * n, sampling, record_logprobs=run.recasts or run.autocast)
    measured = {"generate": pk.start + pk.bytes - baseline}
    policy.train()
    ids, attn, resp = gen.input_ids[:m], gen.attention_mask[:m], gen.response_mask[:m]
    with measure_peak() as pk:
        amap = _train_step(policy, opt, ids, attn, resp, run)
    measured["update"] = pk.start + pk.bytes - baseline
    with measure_peak() as pk:
        trace_flow(amap, gen.question_mask[:m], resp & (torch.arange(resp.shape[1]) == resp.shape[1] - 1),
                   valid_mask=attn.bool())
    measured["flow"] = pk.start + pk.bytes - baseline
    predicted = plan(shape, run).phases
    return [(name, ph, predicted[ph], measured[ph]) for ph in ("generate", "update", "flow")]


def main(argv=None) -> None:
    import json
    import os
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, *CASES[args.one])))
        return
    rows = []
    t0 = time.time()
    for name in args.cases.split(","):  # one process per case: a clean baseline each
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                             check=True, env=env)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print("| case | phase | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|")
    for name, ph, p, m in rows:
        print(f"| {name} | {ph} | {p / 2**20:.0f} | {m / 2**20:.0f} | {100 * (p - m) / m:+.0f}% |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
