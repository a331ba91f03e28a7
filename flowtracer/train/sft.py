"""Supervised fine-tuning (SFT) as a first-class command: a warm start for RL.

    flowtracer sft --config experiments/sft/chains.yaml
    flowtracer sft --config experiments/sft/chains.yaml --ckpt_path last     # resume
    flowtracer fit --config ... --model.model <export_dir>                    # RL from the result

Features: the policy loading and LoRA of `fit` (flowtracer.model.policy.load_policy; LoRA or full
fine-tuning); prompts rendered exactly as RL renders them (flowtracer.data.prompts.format_prompt,
chat template, instruction, system prompt), the target response = the row's worked solution
followed by the eos token; cross-entropy on response tokens only (prompt and padding are labelled
-100); AdamW, linear warm-up then cosine decay to `min_lr_ratio`; gradient clipping through
`trainer.gradient_clip_val`. Precisions: float32 (default), `trainer.precision: bf16-mixed` (CPU and
GPU; the cross-entropy is taken on the logits upcast to float32) or 16-mixed (CUDA; then the
multi-tensor AdamW), bf16 weights (`model_dtype`).
Checkpoints and resume as in `fit`: atomic checkpoints (flowtracer.runs.checkpoints) every
`checkpoint.every_n_train_steps`, the crash-safe CSV logger, `--ckpt_path last`; a checkpoint
holds the trainable weights (adapters under LoRA), optimizer, scheduler and loop state, and the
batch of step s is a function of (seed, s), so a resumed run sees the batches it would have seen.
At the end the model is written as a plain transformers folder at `export_dir` (LoRA merged in;
config, safetensors, tokenizer, flowtracer_sft.json), written to a temporary folder and renamed
into place; under LoRA the adapter alone also goes to `<export_dir>/adapter` (load_policy accepts
it too: the base model with the adapter merged).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import uuid
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowtracer.config import LoraSpec
from flowtracer.data import prompts
from flowtracer.data.datamodule import DEFAULT_INSTRUCTION, is_generated
from flowtracer.data.sources import DataError, load_rows
from flowtracer.errors import InputError
from flowtracer.model.casts import autocast_linears
from flowtracer.model.policy import is_lora, load_policy
from flowtracer.runs.checkpoints import install_atomic_io


def target_text(row: dict, field: str) -> str:
    """The supervised response of a row: row[field], else row["meta"][field]."""
    value = row.get(field, (row.get("meta") or {}).get(field))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"a training row has no '{field}' text (in the row or its meta); set data.target_field "
                        f"to the field holding the worked response (question: {str(row.get('question'))[:60]!r})")
    return value


def build_batch(tokenizer, prompt_texts: list[str], responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token batch of prompt + response + eos: prompts left-padded to one width P, responses
    right-padded after it (the rollout layout, so every response starts at column P).

    Returns input_ids, attention_mask, position_ids (cumsum of the mask - 1) and labels (the token id
    on response tokens and eos, -100 on prompt and padding). Responses are cut so that the
    sequence fits `max_length` (a cut response keeps no eos).
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    r_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    P = max(map(len, p_ids))
    if P >= max_length:
        raise DataError(f"a prompt has {P} tokens, max_length is {max_length}; raise data.max_length")
    R = min(max(map(len, r_ids)), max_length - P)
    ids = torch.full((len(p_ids), P + R), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):  # per row, not per token: B short copies
        r = r[:R]
        ids[i, P - len(p):P], ids[i, P:P + len(r)] = torch.tensor(p), torch.tensor(r)
        mask[i, P - len(p):P + len(r)] = 1
        labels[i, P:P + len(r)] = torch.tensor(r)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels, "prompt_len": P}


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled tokens, and their count.

    Logits are computed only from column P-1 on (the positions that predict response tokens), so
    the vocabulary projection never runs over the prompt."""
    P = int(batch["prompt_len"])
    keep = batch["input_ids"].shape[1] - P + 1
    with autocast_linears(model):  # under bf16-mixed: frozen weights cast once, not per call
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=keep)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1: columns P-1 .. T-2
    labels = batch["labels"][:, P:]
    n = int((labels != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n


class SFTDataModule(L.LightningDataModule):
    """Rows for SFT: batches of training rows addressed by step (exact resume), validation rows.

    Args:
        train_source (str, default "data/chains_train.jsonl"): flowtracer.data.sources grammar.
        val_source (str | None, default "data/chains_val.jsonl"): validation rows (loss only).
        train_size (int | None, default None): generated rows (chains, reasoning_gym) or a cap.
        val_size (int, default 32): validation rows (cap); 0 = no validation.
        task_kwargs (dict | None, default None): generator knobs of a generated source.
        target_field (str, default "solution"): row (or row["meta"]) field with the response.
        batch_size (int, default 8): sequences per optimizer step.
        max_length (int, default 256): prompt + response tokens (responses cut to fit).
        seed (int, default 0): epoch permutations of the training rows.
        instruction / system_prompt / use_chat_template: as in PromptDataModule (use the values the
            RL config will use, so SFT and RL prompts are identical).
    """

    def __init__(self, train_source: str = "data/chains_train.jsonl", val_source: str | None = "data/chains_val.jsonl",
                 train_size: int | None = None, val_size: int = 32, task_kwargs: dict[str, Any] | None = None,
                 target_field: str = "solution", batch_size: int = 8, max_length: int = 256, seed: int = 0,
                 instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None,
                 use_chat_template: bool = True):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or max_length < 8:
            raise DataError("data.batch_size must be >= 1 and data.max_length >= 8")
        self.h = self.hparams
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] = []

    def _load(self, source: str, size: int | None, seed: int) -> list[dict]:
        gen = is_generated(source)
        rows = load_rows(source, size=(size or 1000) if gen else size, seed=seed,
                         task_kwargs=self.h.task_kwargs if gen else None)
        for r in rows[:1]:
            target_text(r, self.h.target_field)  # fail early, with the fix, on a missing field
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:
            self.train_rows = self._load(self.h.train_source, self.h.train_size, self.h.seed)
            if self.h.val_source and self.h.val_size:
                self.val_rows = self._load(self.h.val_source, self.h.val_size, self.h.seed + 1)[: self.h.val_size]

    def train_batch(self, step: int) -> list[dict]:
        """The rows of optimizer step `step`: a pure function of (seed, step)."""
        n, b = len(self.train_rows), self.h.batch_size
        out = []
        for g in range(step * b, (step + 1) * b):
            gen = torch.Generator().manual_seed(self.h.seed * 1_000_003 + g // n)
            out.append(self.train_rows[torch.randperm(n, generator=gen)[g % n].item()])
        return out

    def format_prompt(self, tokenizer, question: str) -> str:
        return prompts.format_prompt(tokenizer, question, system_prompt=self.h.system_prompt,
                                     instruction=self.h.instruction, use_chat_template=self.h.use_chat_template)[0]

    def train_dataloader(self) -> DataLoader:
        # paces Lightning's loop; the module asks train_batch(global_step) for the rows
        return DataLoader(range(10**9), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=self.h.batch_size, collate_fn=list)


class SFTModule(L.LightningModule):
    """Response-only cross-entropy on (prompt, worked response) pairs.

    Args:
        model (str, default "smollm2-135m-instruct"): bundled name, folder, .gguf or hub id.
        lora (LoraSpec | None, default LoraSpec()): adapters; null = full fine-tuning.
        model_dtype (str, default "float32"), attn_implementation (str, default "sdpa"),
        gradient_checkpointing (bool, default False): as in GRPOModule.
        lr (float, default 2e-4): peak AdamW learning rate.
        weight_decay (float, default 0.0).
        warmup_steps (int, default 10): linear warm-up from 0.
        min_lr_ratio (float, default 0.1): cosine decay to lr * min_lr_ratio at trainer.max_steps.
        fused_adamw (bool, default True): torch's fused AdamW kernel (one pass over all weights; on the
            CPU it halves the optimizer step of full fine-tuning); False = the multi-tensor one.
        export_dir (str | None, default None): where the final merged model folder goes (None = no export).
    """

    def __init__(self, model: str = "smollm2-135m-instruct", lora: LoraSpec | None = LoraSpec(),
                 model_dtype: str = "float32", attn_implementation: str = "sdpa",
                 gradient_checkpointing: bool = False, lr: float = 2e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 10, min_lr_ratio: float = 0.1, fused_adamw: bool = True,
                 export_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if not lr > 0 or not 0 <= min_lr_ratio <= 1:
            raise InputError("model.lr must be > 0 and model.min_lr_ratio in [0, 1]")
        if model_dtype not in ("float32", "bfloat16"):
            raise InputError(f"model.model_dtype = {model_dtype!r}: use float32 (the default) or bfloat16 (GPUs)")
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.lora = lora  # the dataclass itself (hparams may hold it as a plain dict)
        self.policy = self.tokenizer = None

    def configure_model(self) -> None:
        if self.policy is None:
            h = self.hparams
            self.policy, self.tokenizer = load_policy(h.model, dtype=h.model_dtype, lora=self.lora,
                                                      attn_implementation=h.attn_implementation,
                                                      gradient_checkpointing=h.gradient_checkpointing)

    def setup(self, stage: str) -> None:

        install_atomic_io(self.trainer)
        self.configure_model()

    def configure_optimizers(self):
        h, total = self.hparams, max(int(self.trainer.max_steps), 1)
        # 16-mixed: a fused AdamW unscales inside its step, after Lightning would clip: the multi-tensor one
        fused = h.fused_adamw and self._scaler() is None
        opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=h.lr,
                                weight_decay=h.weight_decay, fused=True if fused else None)

        def factor(s: int) -> float:
            if s < h.warmup_steps:
                return (s + 1) / (h.warmup_steps + 1)
            t = min(1.0, (s - h.warmup_steps) / max(total - h.warmup_steps, 1))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _scaler(self):
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Without a loss scaler (32-true, bf16-mixed) the gradients are the true ones; Lightning's
        # mixed-precision plugin refuses to clip a fused AdamW's all the same, so clip them here.
        if gradient_clip_val and self._scaler() is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _batch(self, rows: list[dict]) -> dict:
        dm = self.trainer.datamodule
        texts = [dm.format_prompt(self.tokenizer, r["question"]) for r in rows]
        targets = [target_text(r, dm.h.target_field) for r in rows]
        batch = build_batch(self.tokenizer, texts, targets, dm.h.max_length)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def training_step(self, _, batch_idx):
        rows = self.trainer.datamodule.train_batch(self.trainer.global_step)
        loss, n = response_loss(self.policy, self._batch(rows))
        self.log_dict({"train/loss": loss.detach(), "train/response_tokens": float(n),
                       "lr": self.trainer.optimizers[0].param_groups[0]["lr"]},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=len(rows))
        return loss

    def validation_step(self, rows, batch_idx):
        loss, n = response_loss(self.policy, self._batch(rows))
        self.log("val/loss", loss, on_epoch=True, batch_size=n, prog_bar=True)

    def on_save_checkpoint(self, checkpoint) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            path = export_model(self.policy, self.tokenizer, self.hparams.export_dir,
                                {"base": self.hparams.model, "steps": int(self.trainer.global_step),
                                 "lora": None if not is_lora(self.policy) else vars(self.lora)})
            print(f"[flowtracer sft] merged model written to {path}", file=sys.stderr)


def export_model(model, tokenizer, export_dir: str, info: dict) -> str:
    """Write `model` (LoRA merged in, the live model untouched) as a transformers folder, atomically:
    a temporary sibling folder renamed into place; an existing folder is replaced only once the new
    one is complete. Under LoRA the adapter alone goes to <export_dir>/adapter as well."""

    target = os.path.abspath(os.path.expanduser(export_dir))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
    try:
        plain = copy.deepcopy(model)
        if is_lora(plain):
            model.save_pretrained(os.path.join(tmp, "adapter"))
            tokenizer.save_pretrained(os.path.join(tmp, "adapter"))
            plain = plain.merge_and_unload()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "flowtracer_sft.json"), "w") as f:
            json.dump(info, f, indent=1, default=str)
        old = None
        if os.path.exists(target):
            old = f"{tmp}-old"
            os.rename(target, old)
        os.rename(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
