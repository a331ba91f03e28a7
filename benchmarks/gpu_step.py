"""Device check: real RL steps on random-weight Qwen3-shaped models with LoRA in bf16. Prints tables.

    python benchmarks/gpu_step.py                             # 0.6B, 1.7B, 4B on one GPU (< 8 min, H200)
    python benchmarks/gpu_step.py --shapes 4b --steps 2       # one shape, more steps
    python benchmarks/gpu_step.py --device cpu --shape tiny   # CPU dry mode (seconds; run by the tests)
    python benchmarks/gpu_step.py --precision bf16-mixed      # float32 weights under autocast, bf16 rollouts + TIS

What it does, per shape (models built from the shape in flowtracer.memory.planner, random weights, nothing
downloaded; a synthetic 151,936-token tokenizer; a self-contained reward (a hash of the response,
answer span = its last 12 characters), so random responses get rewards with spread):
  1. `--steps` RL steps through the real trainer (GRPOModule + Lightning Trainer + PromptDataModule
     on a local JSONL) with FlowCredit and with uniform credit: `--prompts` x `--G` rollouts of
     `--max-new-tokens` (1K) tokens (random weights rarely emit EOS, so responses run to the cap),
     LoRA r=16 on the attention projections, gradient checkpointing, generation_batch_size: auto.
     Prints per-phase seconds of the last step, generated tokens/s, the credit share of the step,
     and the peak allocated GPU memory next to the planner's prediction (flowtracer.memory.planner).
  2. Generation paths on `--paths-shape`: `generate` with engine hf (dynamic cache), fast (our
     own decode loop, flowtracer.generation.fast: `auto` keeps hf on CUDA until this says otherwise), hf_static
     (static cache; transformers compiles the decoding step: first call = compile) and hf_paged
     (continuous batching), `--path-tokens` new tokens: seconds and generated tokens/s.
It imports neither datasets, jsonargparse, reasoning-gym nor math-verify (the GPU image has torch
2.11, transformers 5.17, lightning 2.6 and peft only): no CLI, no verifier registry.
Optional extra checks when time allows (they need jsonargparse, i.e. the CLI):
    flowtracer fit --config experiments/quickstart.yaml --config experiments/scale_out/ddp_gpu.yaml
    flowtracer fit --config experiments/quickstart.yaml --config experiments/scale_out/fsdp_gpu.yaml
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowtracer.memory.planner import SHAPES, ModelShape, plan

TINY = ModelShape(vocab=512, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16,
                  tied=True, max_positions=4096)
CLI_SHAPES = {"0.6b": SHAPES["qwen3-0.6b"], "1.7b": SHAPES["qwen3-1.7b"], "4b": SHAPES["qwen3-4b"], "tiny": TINY}
SPECIALS = ["<pad>", "<|endoftext|>"]


def build_tokenizer(vocab: int):
    """Characters as tokens (prompts), then filler tokens up to the model's vocabulary (responses)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + list(string.printable)
    names += [f"<t{i}>" for i in range(vocab - len(names))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|endoftext|>")
    tok.padding_side = "left"
    return tok


def build_policy(shape: ModelShape, device: str, gradient_checkpointing: bool = True, dtype=torch.bfloat16):
    """A random-weight Qwen3 of `shape` in `dtype` on `device`, with LoRA (flowtracer.model.policy)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from flowtracer.config import LoraSpec
    from flowtracer.model.policy import prepare_policy

    cfg = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      tie_word_embeddings=shape.tied, max_position_embeddings=shape.max_positions,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return prepare_policy(model, build_tokenizer(shape.vocab), lora=LoraSpec(r=16, alpha=32),
                          gradient_checkpointing=gradient_checkpointing, name="random qwen3")[0]


def reward(response: str, reference) -> object:
    """Self-contained reward for random responses: a hash bit, answer span = the last 12 characters."""
    from flowtracer.rewards.base import Score

    n = len(response)
    return Score(float(zlib.crc32(response.encode()) & 1), (max(0, n - 12), n) if n else None, response[-12:])


class MemoryRows(list):
    """Prompt rows held in memory, with the two reads PromptDataModule makes of its training rows
    (`take`, `questions`): the GPU image has no `datasets`, which reads every data file."""

    def take(self, indices) -> list[dict]:
        return [self[i] for i in indices]

    def questions(self):
        return (r["question"] for r in self)


def prompt_rows(n: int = 64) -> MemoryRows:
    return MemoryRows({"question": f"Problem {i}: compute {3 * i + 7} times {i % 9 + 2}, then subtract {i}. "
                                   "Show every step.", "answer": "0", "verifier": "math", "meta": {}} for i in range(n))


class _Grab:
    """Lightning callback that keeps the logged metrics of every step."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Grab(Callback):
            def __init__(self):
                self.steps = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        return Grab()


def rl_run(policy, tok, arm: str, args, data: MemoryRows, device: str) -> dict:
    """`args.steps` real RL steps with the given credit arm; metrics of the last step + memory."""
    from lightning.pytorch import Trainer

    from flowtracer.config import LoraSpec, OptimConfig, SamplingConfig
    from flowtracer.credit import FlowCredit
    from flowtracer.data import PromptDataModule
    from flowtracer.memory.planner import shape_from_config
    from flowtracer.train.module import GRPOModule
    from flowtracer.train.preflight import memory_runspec

    sampling = SamplingConfig(num_generations=args.G, max_new_tokens=args.max_new_tokens, temperature=0.99,
                              top_k=100, generation_batch_size="auto")
    module = GRPOModule(model="random", lora=LoraSpec(r=16, alpha=32), model_dtype=_weights(args.precision),
                        gradient_checkpointing=True, sampling=sampling,
                        optim=OptimConfig(lr=1e-5, micro_batch_size=args.micro),
                        val_before_training=False, log_rollouts=False)
    module.policy, module.tokenizer = policy, tok  # built here, so configure_model loads nothing
    module.verifiers = lambda row: reward  # every row's verifier: nothing optional (math-verify) is imported
    dm = PromptDataModule(train_source="(in memory)", val_source=None, val_size=0, prompts_per_step=args.prompts,
                          use_chat_template=False, instruction=None)
    dm.train_rows = data  # set: setup() then loads nothing
    arms = [FlowCredit(layers="middle", fallback="last_token")] if arm == "flow" else []
    grab = _Grab()
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      precision=args.precision, callbacks=[*arms, grab])
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    prompt_tokens = max(len(tok(dm.format_prompt(tok, r["question"])[0])["input_ids"]) for r in dm.train_rows)
    run = memory_runspec(module, args.prompts, prompt_tokens, arms, torch.device(device))
    planned = plan(shape_from_config(policy.config), run)
    return {**grab.steps[-1], "peak": peak, "planned": planned.peak, "planned_phase": planned.peak_phase,
            "gen_rows": module.sampling.generation_batch_size}


def gen_paths(policy, tok, args, device: str) -> list[tuple]:
    """(engine, first call s, second call s, tokens/s of the second call, error) per generation path."""
    from flowtracer.config import SamplingConfig
    from flowtracer.generation import generate
    from flowtracer.model.policy import merged_lora

    prompts = [f"Problem {i}: compute {i} + {2 * i} and show the steps." for i in range(args.prompts)]
    out = []
    for engine in args.paths.split(","):
        if engine == "hf_paged" and device != "cuda":
            out.append((engine, float("nan"), float("nan"), float("nan"), "skipped: CUDA only"))
            continue
        sampling = SamplingConfig(num_generations=args.G, max_new_tokens=args.path_tokens, temperature=0.99,
                                  top_k=100, engine=engine)
        times, tokens, err = [], 0, ""
        policy.eval()
        try:
            with merged_lora(policy):
                for _ in range(2):  # the first call of hf_static compiles
                    _sync(device)
                    t0 = time.perf_counter()
                    gen = generate(policy, tok, prompts, [None] * len(prompts), sampling)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                    tokens = int(gen.response_mask.sum())
        except Exception as exc:  # noqa: BLE001  (a path that fails on this stack is reported, not fatal)
            err = f"{type(exc).__name__}: {str(exc)[:80]}"
        policy.train()
        times += [float("nan")] * (2 - len(times))
        out.append((engine, times[0], times[1], tokens / times[1] if tokens else float("nan"), err))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


DECODE_S_PER_LAYER = 1.2e-3  # HF generate step on an H100-class GPU, launch-bound (README's H100
# numbers give ~54 ms per step for 28 layers with the older generate path; ~0.8 ms/layer is typical
# with merged adapters): a middle value, so the estimate errs long


def shape_seconds(sh: ModelShape, args) -> float:
    """Estimated seconds for one shape: 2 arms x steps x (1K decode steps + update) + build/start-up.
    Update: 8 N T FLOPs (6 N T + checkpointing recompute) at 35% of bf16 peak (990 TFLOP/s)."""
    decode = args.max_new_tokens * DECODE_S_PER_LAYER * sh.layers
    tokens = args.prompts * args.G * (args.max_new_tokens + 100)
    update = 8 * sh.params * tokens / (0.35 * 990e12)
    return 15 + 2 * args.steps * (decode + update + 5)


def paths_seconds(args) -> float:
    """Generation paths: each engine x 2 calls, plus ~60 s for the static-cache compile."""
    engines = len(args.paths.split(","))
    return 60 + engines * 2 * args.path_tokens * DECODE_S_PER_LAYER * CLI_SHAPES[args.paths_shape].layers


def estimate_seconds(shapes: list[ModelShape], args, device: str) -> float:
    if device != "cuda":
        return 10.0
    return 20 + sum(shape_seconds(sh, args) for sh in shapes) + paths_seconds(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", "--shape", default=None, help="comma list of 0.6b,1.7b,4b,tiny "
                    "(default: 0.6b,1.7b,4b on cuda, tiny on cpu)")
    ap.add_argument("--steps", type=int, default=1, help="RL steps per credit arm")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4; 2 on cpu)")
    ap.add_argument("--G", type=int, default=None, help="responses per prompt (default 8; 4 on cpu)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response cap (default 1024; 16 on cpu)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch size (default 8; 4 on cpu)")
    ap.add_argument("--paths", default="hf,fast,hf_static,hf_paged", help="generation engines to time")
    ap.add_argument("--paths-shape", default=None, help="shape for the generation paths (default 1.7b; tiny on cpu)")
    ap.add_argument("--path-tokens", type=int, default=None, help="new tokens per path call (default 256; 8 on cpu)")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                    help="32-true: bf16 weights (default); bf16-mixed: float32 weights under autocast, "
                    "rollouts in bf16 corrected by TIS (flowtracer.train.precision)")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip a shape or the path timings whose "
                    "estimate would end past this many seconds (default 450: the run stays < 8 min)")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("gpu_step: error: no CUDA device; run with --device cpu --shape tiny for the dry mode", file=sys.stderr)
        return 2
    defaults = dict(shapes="tiny" if cpu else "0.6b,1.7b,4b", prompts=2 if cpu else 4, G=4 if cpu else 8,
                    max_new_tokens=16 if cpu else 1024, micro=4 if cpu else 8,
                    paths_shape="tiny" if cpu else "1.7b", path_tokens=8 if cpu else 256)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = args.shapes.split(",")
    estimate = estimate_seconds([CLI_SHAPES[n] for n in names], args, args.device)
    print(f"gpu_step: shapes {names}, precision {args.precision} over {_weights(args.precision)} weights, "
          f"{args.steps} step(s) x 2 arms, {args.prompts} x {args.G} rollouts of "
          f"{args.max_new_tokens} tokens; estimated {estimate / 60:.1f} min", flush=True)
    t0 = time.perf_counter()
    lines = run_all(names, args, args.device)
    lines.append(f"\ntotal {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name() if not cpu else 'cpu'}")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def run_all(names: list[str], args, device: str) -> list[str]:
    data = prompt_rows()
    step_rows, path_rows = [], []
    t0 = time.perf_counter()
    for name in names:
        left = args.budget_s - (time.perf_counter() - t0)
        if device == "cuda" and shape_seconds(CLI_SHAPES[name], args) > left:
            step_rows.append(f"| {name} | skipped: estimated {shape_seconds(CLI_SHAPES[name], args):.0f} s, "
                             f"{left:.0f} s left of --budget-s |" + " |" * 12)
            continue
        policy = build_policy(CLI_SHAPES[name], device, dtype=getattr(torch, _weights(args.precision)))
        tok = build_tokenizer(CLI_SHAPES[name].vocab)
        for arm in ("flow", "uniform"):
            m = rl_run(policy, tok, arm, args, data, device)
            step_rows.append(_step_line(name, arm, m))
            print(step_rows[-1], flush=True)
        fits = device != "cuda" or paths_seconds(args) <= args.budget_s - (time.perf_counter() - t0)
        if name == args.paths_shape and not fits:
            path_rows.append(f"| {name} | skipped: estimated {paths_seconds(args):.0f} s, over --budget-s | | | | |")
        elif name == args.paths_shape:
            path_rows += [f"| {name} | {e} | {a:.1f} | {b:.1f} | {tps:,.0f} | {err} |"
                          for e, a, b, tps, err in gen_paths(policy, tok, args, device)]
        del policy
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    head = ["| shape | credit | step s | generate | score | old_pass | credit | forward | backward | "
            "credit share | gen tok/s | gen rows/call | peak GiB | planned GiB (phase) |", "|" + "---|" * 14]
    paths = ["", f"generation paths ({args.prompts} x {args.G} rows, {args.path_tokens} new tokens; "
             "first call of hf_static compiles)", "| shape | engine | first call s | second call s | tok/s | note |",
             "|" + "---|" * 6]
    return head + step_rows + (paths + path_rows if path_rows else [])


def _weights(precision: str) -> str:
    """The weights' dtype: bf16 for a plain run; float32 under autocast (bf16-mixed keeps float32 masters)."""
    return "float32" if precision == "bf16-mixed" else "bfloat16"


def _step_line(name: str, arm: str, m: dict) -> str:
    def t(k):
        return f"{m.get('time/' + k, 0.0):.2f}"

    def gib(b):
        return "n/a" if math.isnan(b) else f"{b / 2**30:.3f}"

    return (f"| {name} | {arm} | {t('step')} | {t('generate')} | {t('score')} | {t('old_pass')} | {t('credit')} | "
            f"{t('forward')} | {t('backward')} | {100 * m.get('time/credit_share', 0.0):.1f}% | "
            f"{m.get('throughput/gen_tokens_per_s', 0.0):,.0f} | {m['gen_rows']} | {gib(m['peak'])} | "
            f"{gib(m['planned'])} ({m['planned_phase']}) |")


if __name__ == "__main__":
    sys.exit(main())
