"""What the credit step adds to an RL step: each arm's on_rollout_batch, plus the attention capture.

    python benchmarks/credit_overhead.py            # CPU: random tiny Llama, B=8, responses 256 and 1024
    python benchmarks/credit_overhead.py --smoke    # seconds, checks that it runs
    python benchmarks/credit_overhead.py --device cuda --model qwen2.5-1.5b-shape --dtype bfloat16

CPU mode (model "tiny-llama"): the denominator is one teacher-forced forward+backward of the batch
(full fine-tuning, no optimizer step), and every arm runs its real `on_rollout_batch` (token-class
stats included) on the outputs of one shared teacher-forced pass.

GPU mode (model "qwen2.5-1.5b-shape": a random Qwen2.5-1.5B-shaped Qwen2, 28 layers, hidden 1536,
12 heads / 2 KV heads, vocab 151936): the denominator is a LoRA train step (r=16 on q,k,v,o via
peft; forward+backward+AdamW), B=8 responses of 1K tokens after ~128 prompt tokens. Measured:
the capture overhead (teacher-forced pass with the middle-layer map minus the same pass without;
the module runs that pass anyway for the old log-probs) and flow+selection (trace_flow +
select_weights). The paper's target: FlowCredit adds at most ~5% to a step at 1K responses (our
denominator leaves out generation, which dominates a real RL step, so the shares here are upper
bounds). This mode imports only torch, transformers, peft, flowtracer.flow, flowtracer.model.capture
and flowtracer.credit.select (no Lightning needed). `--smoke` shrinks either mode to seconds.

Timings: median of `--reps` runs after one warm-up, with CUDA synchronisation around each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from flowtracer.credit.select import select_weights  # noqa: E402
from flowtracer.flow import trace_flow  # noqa: E402
from flowtracer.model.forward import teacher_forced_pass  # noqa: E402

QWEN15 = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
              intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN_SMOKE = dict(QWEN15, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                  vocab_size=1000)
LLAMA_CPU = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=768, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA_SMOKE = dict(LLAMA_CPU, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64)


def timed(fn, device: str, reps: int):
    """(median seconds, last result) of `fn()` over `reps` runs after one warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def timed_pair(fa, fb, device: str, reps: int):
    """Median seconds of fa, of fb, of (fb - fa) per pair, and fb's last result: runs alternate, so
    load drift on a shared machine hits both sides alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            sync()
            t0 = time.perf_counter()
            out = f()
            sync()
            ts.append(time.perf_counter() - t0)
    diff = statistics.median(b - a for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), diff, out


def build_model(kind: str, cfg: dict, vocab: int | None, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(cfg, **({"vocab_size": vocab} if vocab else {}))
    config = AutoConfig.for_model(kind, pad_token_id=0, eos_token_id=1, bos_token_id=None, **spec)
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the device: seconds, not minutes, at 1.5B
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def make_batch(B: int, P: int, R: int, vocab: int, device: str, seed: int = 0):
    """Random ids; prompts of P tokens (row 1 left-padded by 8), responses of R tokens ending in EOS.

    Question = the prompt after a 16-token "system" prefix; answer = 4 tokens just before EOS.
    """
    g = torch.Generator().manual_seed(seed)
    T = P + R
    ids = torch.randint(3, vocab, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    pad = min(8, P // 4) if B > 1 else 0
    valid[1, :pad] = False
    ids[~valid] = 0
    ids[:, -1] = 1
    pos = torch.arange(T)
    prompt = (pos < P) & valid
    resp = (pos >= P).expand(B, T).clone()
    question = prompt & (pos >= min(16, P // 2))
    answer = (pos >= T - 5) & (pos < T - 1)
    answer = answer.expand(B, T).clone()
    to = lambda x: x.to(device)  # noqa: E731
    return SimpleNamespace(ids=to(ids), valid=to(valid), prompt=to(prompt), resp=to(resp),
                           question=to(question), answer=to(answer))


def train_step_fn(model, x, opt=None):
    """One teacher-forced forward+backward (+ optimizer step when `opt`) with a token-mean loss."""
    def step():
        out = teacher_forced_pass(model, x.ids, x.valid.long(), capture_layers=None, with_grad=True)
        loss = -(out.logprobs * x.resp).sum() / x.resp.sum()
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
    return step


def generate_fn(model, x, new_tokens: int):
    """Sample `new_tokens` tokens after each prompt (min = max, so the length is the benchmark's)."""
    P = int(x.prompt.sum(1).max())
    ids, mask = x.ids[:, :P], x.valid[:, :P].long()

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=True, top_k=0, pad_token_id=0)
    return run


def pass_fn(model, x, capture):
    return lambda: teacher_forced_pass(model, x.ids, x.valid.long(), capture_layers=capture)


def flow_select_fn(attn, x):
    def run():
        res = trace_flow(attn, x.question, x.answer, valid_mask=x.valid)
        return select_weights(res.throughput, x.resp, top_frac=0.4, gamma=1.5)
    return run


def cpu_arms(model, tok, x, step_s, device, reps):
    """Rows (arm, seconds) for every arm's on_rollout_batch on one shared teacher-forced pass."""
    from flowtracer.batch import RolloutBatch
    from flowtracer.credit import AttentionCredit, EntropyCredit, FlowCredit, RandomCredit, UniformCredit

    out = teacher_forced_pass(model, x.ids, x.valid.long(), capture_layers="middle")
    B = x.ids.shape[0]
    rb = RolloutBatch(input_ids=x.ids, attention_mask=x.valid.long(), prompt_mask=x.prompt, response_mask=x.resp,
                      question_mask=x.question, answer_mask=x.answer, rewards=torch.zeros(B),
                      advantages=torch.zeros(B), group_ids=torch.zeros(B, dtype=torch.long),
                      old_logprobs=out.logprobs, entropies=out.entropy, attn=out.attn)
    module = SimpleNamespace(tokenizer=tok, rl_step=0)
    arms = [("uniform", UniformCredit()), ("random", RandomCredit()), ("entropy top-40%", EntropyCredit()),
            ("entropy 80/20", EntropyCredit(variant="80/20")), ("attention mean", AttentionCredit()),
            ("attention max", AttentionCredit(variant="max")), ("flow", FlowCredit())]
    rows = []
    for name, arm in arms:
        s, _ = timed(lambda arm=arm: arm.on_rollout_batch(None, module, rb), device, reps)
        rows.append((name, s))
    rows.append(("  of which flow engine", rb.metrics["credit/flow_seconds"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "qwen2.5-1.5b-shape"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resp-lens", default=None, help="comma-separated response lengths "
                   "(default 256,1024 for tiny-llama, 1024 for qwen2.5-1.5b-shape)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 64 (tiny-llama) / 128 (qwen)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU mode)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in the train step (GPU memory)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep: seconds")
    p.add_argument("--generate", action="store_true",
                   help="also time HF generate of the R response tokens (sampled, KV cache, no early stop) "
                        "and report FlowCredit's share of a whole RL step: generate + pass + train step")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    qwen = args.model == "qwen2.5-1.5b-shape"
    dtype = getattr(torch, args.dtype)
    lens = [int(v) for v in (args.resp_lens or ("1024" if qwen else "256,1024")).split(",")]
    P = args.prompt_len or (128 if qwen else 64)
    B, reps = args.batch, args.reps
    if args.smoke:
        lens, P, B, reps = [32], 16, 2, 1
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.model}{' (smoke shape)' if args.smoke else ''}, "
          f"{args.dtype}, B={B}, prompt {P} tokens")

    tok = None
    if qwen:
        model = build_model("qwen2", QWEN_SMOKE if args.smoke else QWEN15, None, dtype, args.device)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        denom = "LoRA train step (fwd+bwd+AdamW)"
        vocab = model.config.vocab_size
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from tiny import tiny_tokenizer  # a real tokenizer for the token-class stats

        tok = tiny_tokenizer()
        model = build_model("llama", LLAMA_SMOKE if args.smoke else LLAMA_CPU, len(tok), dtype, args.device)
        opt = None
        denom = "teacher-forced fwd+bwd (full FT)"
        vocab = len(tok)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}, {denom}")

    results = []
    for R in lens:
        x = make_batch(B, P, R, vocab, args.device)
        model.train()
        step_s, _ = timed(train_step_fn(model, x, opt), args.device, reps)
        model.eval()
        base_s, _, capture, out = timed_pair(pass_fn(model, x, None), pass_fn(model, x, "middle"), args.device, reps)
        rows = [(f"step: {denom}", step_s), ("teacher-forced pass, no capture", base_s),
                ("attention capture (extra)", capture)]
        if qwen:
            flow_s, w = timed(flow_select_fn(out.attn, x), args.device, reps)
            assert w.shape == x.resp.shape
            rows.append(("flow + selection", flow_s))
            rows.append(("FlowCredit total (capture + flow)", capture + flow_s))
        else:
            arms = cpu_arms(model, tok, x, step_s, args.device, reps)
            rows += arms
            flow_s = dict(arms)["flow"]
            rows.append(("FlowCredit total (capture + arm)", capture + flow_s))
        if args.generate:
            gen_s, _ = timed(generate_fn(model, x, R), args.device, 1)
            rows.append(("HF generate of the responses", gen_s))
            rl_step_s = gen_s + base_s + capture + flow_s + step_s
            rows.append(("whole RL step (generate+pass+credit+train)", rl_step_s))
        print(f"\nresponse {R} tokens (T = {P + R}), median of {reps}")
        print(f"{'what':<40} {'ms':>10} {'% of step':>10}")
        for name, s in rows:
            print(f"{name:<40} {1e3 * s:>10.1f} {100 * s / step_s:>9.2f}%")
        if args.generate:
            print(f"FlowCredit share of the whole RL step: {100 * (capture + flow_s) / rl_step_s:.2f}%")
        results.append({"resp_len": R, "T": P + R, "B": B, "rows": {n: s for n, s in rows}, "step_s": step_s})
        del x, out
    if args.device == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "model": args.model, "dtype": args.dtype, "smoke": args.smoke,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
