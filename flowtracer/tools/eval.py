"""`flowtracer eval` (alias `flowtracer test`): a policy on the config's eval sets, by benchmark.

    flowtracer eval --config experiments/eval/math.yaml --model smollm2-135m-instruct   # a base model
    flowtracer eval --ckpt_path lightning_logs/quickstart/version_0/checkpoints/last.ckpt  # a run
    flowtracer eval --config experiments/quickstart.yaml --model exported/merged         # an export

The sets are the config's ``data.eval_sets`` (or its single validation set, "default"), with the
config's prompt settings and ``model.val_sampling`` as defaults (flowtracer.config.EvalSet).
The policy: --ckpt_path = a fit checkpoint or run folder, on its run's base model and LoRA settings
(the run's config.yaml, else the settings saved in the checkpoint, else --config: the rules of
flowtracer.tools.runs, shared with export); --config says what to evaluate on (default: the run's);
--model = a model folder, bundled name or hub id, as is (e.g. a `flowtracer export --merge`
folder); neither = the config's model.model, untrained. Samples are drawn with per-row seeds from
model.seed (or --seed): the same model and seed give the same numbers, whatever --batch_size.
Prints one table per set and the macro average (mean avg@k over the math sets), and writes
eval.json, eval.md and eval_samples.jsonl (every response) to --out, by default the run folder of
--ckpt_path, else lightning_logs/eval/<model name>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flowtracer.errors import InputError
from flowtracer.evaluation.engine import evaluate
from flowtracer.evaluation.report import markdown, print_table, to_json
from flowtracer.generation import engine_line
from flowtracer.model.policy import load_policy
from flowtracer.runs.csvlog import atomic_write_text
from flowtracer.tools.runs import instantiate, load_checkpoint_into, merged_configs, run_config, run_dir_of
from flowtracer.train.preflight import check_references


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowtracer eval", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="fit-style config with data.eval_sets (default: the run's config.yaml); repeat to "
                        "overlay several, e.g. --config run.yaml --config experiments/eval/math.yaml")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt_path", default=None, help="a fit checkpoint (<run>/checkpoints/last.ckpt) or run folder")
    src.add_argument("--model", default=None, help="a model folder, bundled name or hub id, evaluated as is")
    p.add_argument("--out", default=None, help="folder for eval.json / eval.md / eval_samples.jsonl")
    p.add_argument("--sets", default=None, help="comma-separated subset of the eval set names")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set (quick looks)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="prompts per generate call (default data.val_batch_size)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default model.seed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    return p.parse_args(argv)


def _policy(args, settings):
    """(policy, tokenizer, label, default out folder) as --ckpt_path / --model / the config say."""

    if args.ckpt_path:  # the run's own model and LoRA settings, then its trained tensors
        cfg, source = run_config(args.ckpt_path, args.config)
        trained, _ = instantiate(cfg)
        state = load_checkpoint_into(trained, args.ckpt_path)
        print(f"flowtracer eval: model settings from {source}")
        label = f"{args.ckpt_path} (rl_step {state.get('rl_step')})"
        return trained.policy, trained.tokenizer, label, run_dir_of(args.ckpt_path)
    name = args.model or settings.model_name  # an exported or base model: weights as they are
    policy, tokenizer = load_policy(name, dtype=settings.model_dtype,
                                    attn_implementation=settings.attn_implementation, lora=None)
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name) or "model"
    return policy, tokenizer, name, Path("lightning_logs") / "eval" / folder


def _device(name: str):

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _selected(data, sets_arg: str | None, limit: int | None) -> dict:
    data.setup_eval()  # the eval sets only, not the training data
    names = list(data.eval_rows)
    if sets_arg:
        wanted = [s.strip() for s in sets_arg.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in data.eval_specs]
        if unknown:
            raise InputError(f"--sets {','.join(unknown)}: no such eval set; "
                             f"the config has {', '.join(data.eval_specs)}")
        names = [n for n in names if n in wanted]
    if not names:
        raise InputError("the config has no evaluation rows: set data.eval_sets (or val_source/val_size)")
    return {n: (data.eval_specs[n], data.eval_rows[n][:limit] if limit else data.eval_rows[n]) for n in names}


def run(args) -> tuple[dict, Path]:
    """Evaluate as `args` say; returns (result, out folder). Writes nothing."""


    if not (args.config or args.ckpt_path):
        raise InputError("give --config (what to evaluate on), --ckpt_path (a run), or both")
    if (args.batch_size is not None and args.batch_size < 1) or (args.limit is not None and args.limit < 1):
        raise InputError("--batch_size and --limit must be >= 1")
    cfg = merged_configs(args.config) if args.config else run_config(args.ckpt_path)[0]
    settings, data = instantiate(cfg)  # sampling, seed, prompts and sets to evaluate with
    policy, tokenizer, label, default_out = _policy(args, settings)
    policy.to(_device(args.device))
    sets = _selected(data, args.sets, args.limit)
    for name, (_, rows) in sets.items():  # the fit pre-flight's checks: math-verify works, references parse
        check_references(settings, rows, f"eval set {name}")
    total = sum(len(rows) for _, rows in sets.values())
    print(engine_line(policy, settings.val_sampling))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("eval", total=total)
        result = evaluate(
            policy, tokenizer, sets, settings.val_sampling,
            lambda row, spec: data.format_eval_prompt(tokenizer, row),
            seed=settings.seed if args.seed is None else args.seed,
            batch_size=args.batch_size or data.val_batch_size, threshold=settings.loss_cfg.correct_threshold,
            on_batch=lambda name, n: bar.update(task, advance=n, description=f"eval {name}"))
    result["model"] = label
    result["settings"] = {  # what produced these numbers, for the record
        "seed": settings.seed if args.seed is None else args.seed, "batch_size": args.batch_size or data.val_batch_size,
        "sampling": {n: dataclasses.asdict(spec.sampling(settings.val_sampling)) for n, (spec, _) in sets.items()},
        "limit": args.limit}
    return result, Path(args.out) if args.out else default_out


def write(result: dict, out: Path) -> None:
    """eval.json, eval.md, eval_samples.jsonl in `out`, each written atomically."""

    out.mkdir(parents=True, exist_ok=True)
    samples = result.pop("records")
    atomic_write_text(str(out / "eval_samples.jsonl"), "".join(json.dumps(r) + "\n" for r in samples))
    atomic_write_text(str(out / "eval.json"), to_json(result))
    atomic_write_text(str(out / "eval.md"), markdown(result, title=f"evaluation of {result['model']}"))


def main(argv: list[str]) -> int:

    args = parse_args(argv)
    result, out = run(args)
    print_table(result, title="eval")
    write(result, out)
    print(f"flowtracer eval: wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval_samples.jsonl'}")
    return 0
