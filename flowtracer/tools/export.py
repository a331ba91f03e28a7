"""`flowtracer export`: a trained checkpoint as a folder other tools load (transformers, PEFT, vLLM).

    flowtracer export --ckpt_path lightning_logs/quickstart/version_0/checkpoints/last.ckpt --out exported/adapter
    flowtracer export --ckpt_path .../last.ckpt --out exported/merged --merge

LoRA runs: without --merge, a PEFT adapter folder (adapter_config.json + adapter_model.safetensors
+ the tokenizer), loadable with ``PeftModel.from_pretrained(base, DIR)``; its
base_model_name_or_path is the run's base model. With --merge, the adapters are folded into the
weights (W + scale * B A) and the plain model is written with ``save_pretrained`` with its
tokenizer: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it, hence vLLM, lm-eval, lighteval.
Full fine-tuning runs always export the full model. --ckpt_path is a checkpoint or a run folder;
the base model and LoRA settings come from the run's config.yaml, else the settings saved in the
checkpoint, else --config (the rules of flowtracer.tools.runs, shared with eval). The folder is
written under a temporary name and renamed when complete, so a failed export leaves nothing
behind; an existing non-empty --out is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from flowtracer.errors import InputError
from flowtracer.model.policy import is_lora
from flowtracer.tools.runs import checkpoint_file, instantiate, load_checkpoint_into, run_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowtracer export", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True, help="a checkpoint of a fit run (<run>/checkpoints/last.ckpt) or "
                                                     "its run folder")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--merge", action="store_true", help="fold LoRA adapters into the weights: a plain HF model")
    p.add_argument("--config", action="append", default=None,
                   help="the run's config, when neither <run>/config.yaml nor the checkpoint holds its settings")
    return p.parse_args(argv)


def export_policy(policy, tokenizer, out: Path, merge: bool) -> str:
    """Write `policy` to `out` (a fresh folder); returns what was written ("adapter" | "merged" | "full")."""

    if is_lora(policy) and not merge:
        policy.save_pretrained(out, safe_serialization=True)
        kind = "adapter"
    else:
        model = policy.merge_and_unload() if is_lora(policy) else policy
        model.save_pretrained(out, safe_serialization=True)
        kind = "merged" if is_lora(policy) else "full"
    tokenizer.save_pretrained(out)
    return kind


def main(argv: list[str]) -> int:

    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty; choose a new folder or delete it")
    cfg, source = run_config(args.ckpt_path, args.config)
    module, _ = instantiate(cfg)
    print(f"flowtracer export: model settings from {source}")
    state = load_checkpoint_into(module, args.ckpt_path)
    policy = module.policy.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        kind = export_policy(policy, module.tokenizer, tmp, args.merge)
        (tmp / "flowtracer_export.json").write_text(json.dumps({
            "checkpoint": str(checkpoint_file(args.ckpt_path).resolve()), "rl_step": state.get("rl_step"),
            "base_model": module.model_name, "kind": kind}, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"flowtracer export: wrote {kind} model to {out} (rl_step {state.get('rl_step')})")
    return 0
