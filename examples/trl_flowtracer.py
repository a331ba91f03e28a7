"""FlowTracer credit in a TRL GRPO script: SmolLM2-135M-Instruct + LoRA on one-digit additions, offline.

A plain TRL GRPO script with three FlowTracer lines (marked "FlowTracer:" below): the import, the
trainer class, and `credit=`. Everything else is TRL as usual: the dataset has a "prompt" column
(chat messages) plus the columns the reward reads, `GRPOConfig` sets the run. Runs on a CPU in a few
minutes (docs/trl.md has the measured time); each logged step shows TRL's metrics and the credit's
(credit/fallback_frac, credit/reached_frac, credit/selected_frac, credit/seconds, ...).

    HF_HUB_OFFLINE=1 .venv/bin/python examples/trl_flowtracer.py --steps 8

Needs the `trl` extra (`pip install 'flowtracer[trl]'`; `make setup` installs it). The model is the
bundled GGUF converted once into ~/.cache/flowtracer (no download); any hub id or local folder works
the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig

from flowtracer.credit import FlowCredit, UniformCredit  # FlowTracer: a credit arm
from flowtracer.integrations.trl import FlowGRPOTrainer  # FlowTracer: GRPOTrainer + token credit
from flowtracer.model.policy import bundled_model_dir
from flowtracer.rewards import MathVerifier

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Answer with just the final answer inside <answer></answer>."
VERIFIER = MathVerifier()  # <answer>, \boxed{}, ####, or the last number, checked with math-verify


def correctness(completions, answer, **_) -> list[float]:
    """A TRL reward function: 1.0 when the completion's final answer equals the reference."""
    return [VERIFIER(c[0]["content"], a).reward for c, a in zip(completions, answer)]


def dataset(path: Path) -> Dataset:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # "question" (the bare question) tells FlowTracer which prompt tokens the flow starts from.
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{r['question']}\n\n{INSTRUCTION}"}],
                               "question": r["question"], "answer": str(r["answer"])} for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (one prompt x 8 completions each)")
    p.add_argument("--arm", choices=["flow", "uniform"], default="flow", help="uniform = plain GRPO weights")
    p.add_argument("--output_dir", default=None, help="TRL's output folder (default: a temporary one)")
    args = p.parse_args()

    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="trl_flowtracer_"),
        max_steps=args.steps, per_device_train_batch_size=8, num_generations=8, max_completion_length=48,
        temperature=1.0, learning_rate=1e-4, beta=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, seed=0, shuffle_dataset=False, model_init_kwargs={"dtype": "float32"})
    credit = FlowCredit(top_frac=0.4, gamma=1.5) if args.arm == "flow" else UniformCredit()
    trainer = FlowGRPOTrainer(  # FlowTracer: was GRPOTrainer
        model=str(bundled_model_dir("smollm2-135m-instruct")), reward_funcs=correctness, args=config,
        train_dataset=dataset(ROOT / "data/arith_train.jsonl"),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               task_type="CAUSAL_LM"),
        credit=credit)  # FlowTracer: the arm (with extraction=..., question_column="question" by default)
    before = {n: t.detach().clone() for n, t in trainer.model.named_parameters() if t.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = sum(not torch.equal(before[n], after[n].detach()) for n in before)
    change = max((after[n].detach() - t).abs().max().item() for n, t in before.items())

    steps = [h for h in trainer.state.log_history if "reward" in h]
    credit_s = statistics.median(h["credit/seconds"] for h in steps)
    step_s = statistics.median(h["step_time"] for h in steps)
    print(f"\n{len(steps)} steps: reward {steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f}; "
          f"credit {credit_s:.3f} s of a {step_s:.2f} s step (median, {credit_s / step_s:.1%}); "
          f"responses with uniform weights {statistics.mean(h['credit/fallback_frac'] for h in steps):.1%}; "
          f"{moved} of {len(before)} adapter tensors moved (max |change| {change:.2e})")


if __name__ == "__main__":
    main()
