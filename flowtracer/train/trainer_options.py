"""Lightning Trainer options a flowtracer run cannot honour as Lightning means them: mapped onto
flowtracer's own settings, or refused in one line naming the setting to use instead.

The GRPO module optimises manually (one optimizer step per `model.optim.mini_batches`, gradient
accumulation over `model.optim.micro_batch_size` pieces, clipping by `model.optim.grad_clip`), reads
its prompts by step number (not from the dataloader), and keeps its weights in `model.model_dtype`:
of Lightning's precisions it runs 32-true, autocast (`bf16-mixed`; `16-mixed` with loss scaling on
CUDA); `bf16-true` over bf16 weights is mapped to 32-true (the same bf16 weights and matmuls, while
the step's own tensors, advantages and log-probs, stay float32 instead of taking bf16 as the default
dtype); a "*-true" cast of float32 weights is refused (flowtracer.train.precision).
Every run has a checkpoint callback (crash-safe resume, `checkpoint.*`) and a progress bar
(`progress_bar.*`). Each Trainer argument, and what happens to it, is listed in docs/rl-step.md.
Applied by the CLI to the parsed config before the Trainer is built (flowtracer.train.lightning_cli).
"""

from __future__ import annotations

import torch

from flowtracer.errors import InputError

# precision values the GRPO step runs in (its weights' dtype is model.model_dtype); "bf16"/"16" are
# Lightning's short names of the mixed ones
_PRECISIONS = (None, 32, "32", "32-true", "bf16-mixed", "bf16")
_FP16_MIXED = (16, "16", "16-mixed")


def _refuse(key: str, value, why: str) -> None:
    raise InputError(f"trainer.{key} = {value}: {why}")


def check_trainer_options(cfg, manual_optimization: bool = True) -> list[str]:
    """Map or refuse the Trainer options of a parsed fit config (`cfg`: the subcommand's namespace,
    changed in place). Returns one note per mapped option, for the log."""
    t, notes = cfg["trainer"], []
    _check_accelerator(t.get("accelerator"))
    if t.get("barebones"):
        _refuse("barebones", True, "it switches off the logs and checkpoints a flowtracer run writes; drop it "
                "(trainer.logger: false, progress_bar.refresh_rate: 0 and trainer.enable_model_summary: false "
                "remove most of the overhead)")
    if t.get("enable_checkpointing") is False:
        _refuse("enable_checkpointing", False, "every run keeps a checkpoint for crash-safe resume; to write fewer, "
                "set checkpoint.every_n_train_steps: N (or checkpoint.save_last: false with save_top_k: 0)")
    if t.get("enable_progress_bar") is False:
        t["enable_progress_bar"] = None
        cfg["progress_bar.refresh_rate"] = 0
        notes.append("trainer.enable_progress_bar = false -> progress_bar.refresh_rate = 0 (bar hidden)")
    if manual_optimization:
        notes += _grpo_options(cfg)
    return notes


def _grpo_options(cfg) -> list[str]:
    t, notes = cfg["trainer"], []
    acc = t.get("accumulate_grad_batches")
    if acc not in (None, 1):
        _refuse("accumulate_grad_batches", acc, "the GRPO step takes one optimizer step per mini-batch of its own "
                "rollouts; accumulate gradients inside a step with model.optim.micro_batch_size, or update on "
                "more prompts at once with data.prompts_per_step")
    clip, algorithm = t.get("gradient_clip_val"), t.get("gradient_clip_algorithm")
    if algorithm not in (None, "norm"):
        _refuse("gradient_clip_algorithm", algorithm, "the GRPO step clips the gradient norm only "
                "(model.optim.grad_clip); drop the option")
    if clip is not None:
        cfg["model.optim.grad_clip"] = float(clip)
        t["gradient_clip_val"], t["gradient_clip_algorithm"] = None, None
        notes.append(f"trainer.gradient_clip_val = {clip} -> model.optim.grad_clip = {float(clip)} (norm)")
    overfit = t.get("overfit_batches")
    if overfit not in (None, 0, 0.0):
        _refuse("overfit_batches", overfit, "step s's prompts are chosen by step number, not by the dataloader, "
                "so it would change nothing; to train on a few prompts use data.train_size: N")
    if t.get("precision") == "bf16-true" and cfg.get("model.model_dtype") == "bfloat16":
        t["precision"] = "32-true"
        notes.append("trainer.precision = bf16-true -> 32-true over model.model_dtype bfloat16 (bf16 weights and "
                     "matmuls; the step's advantages and log-probs stay float32)")
    _check_precision(t.get("precision"), t.get("accelerator"))
    return notes


def _check_precision(precision, accelerator) -> None:
    if precision in _PRECISIONS:
        return
    if precision in _FP16_MIXED:
        name = str(accelerator).lower() if accelerator is not None else "auto"
        if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
            return
        _refuse("precision", precision, "fp16 autocast with loss scaling runs on CUDA only; on a CPU use "
                "--trainer.precision bf16-mixed (or 32-true)")
    _refuse("precision", precision, "the GRPO step keeps its weights in model.model_dtype and mixes precision "
            "only by autocast; use --trainer.precision bf16-mixed (CPU or GPU), 16-mixed (CUDA) or 32-true, "
            "and for 16-bit weights set model.model_dtype: bfloat16 (bf16-true is then taken as 32-true)")


def _check_accelerator(accelerator) -> None:
    name = str(accelerator).lower() if accelerator is not None else "auto"
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        _refuse("accelerator", accelerator, "this machine has no CUDA GPU that torch can use "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --trainer.accelerator cpu "
                "(or auto), or install a CUDA build of torch on a GPU machine")
    if name == "mps" and not torch.backends.mps.is_available():
        _refuse("accelerator", accelerator, "Apple's MPS backend is not available here; use --trainer.accelerator cpu")
