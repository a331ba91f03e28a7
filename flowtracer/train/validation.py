"""Validation during `fit`, on the evaluation engine (flowtracer.evaluation).

The module's validation hooks delegate here: each validation batch (rows of one eval
set) is generated and verified by `eval_batch`, the records of all processes are gathered at the
end of the epoch and `summarize`d. Logged: ``val/<set>/avg@k``, ``val/<set>/pass@k'``,
``val/<set>/maj@k``, ``val/math_avg`` (mean avg@k over the math sets), and for continuity
``val/pass@1`` = the mean avg@k over all sets (the one set's avg@k for an old config), plus
``val/pass@k`` of the old single validation set.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from flowtracer.config import LEGACY_SET
from flowtracer.evaluation.engine import eval_batch, summarize
from flowtracer.evaluation.report import log_metrics
from flowtracer.train import distributed as dist


def run_batch(module, rows: list[dict]) -> list[dict]:
    """Records of one validation batch (all rows from one eval set)."""
    dm = module.trainer.datamodule
    spec = dm.eval_specs[rows[0]["eval_set"]]
    return eval_batch(module.policy, module.tokenizer, rows, spec.sampling(module.val_sampling),
                      lambda r: dm.format_eval_prompt(module.tokenizer, r), seed=module.seed,
                      verifiers=module.verifiers, threshold=module.loss_cfg.correct_threshold,
                      batch_index=rows[0]["eval_index"] // dm.val_batch_size)


def validation_step(module, rows: list[dict]) -> list[dict]:
    """What the epoch's metrics need of one batch's records (no response texts cross processes)."""
    keep = ("set", "index", "correct", "keys")
    return [{k: r[k] for k in keep} for r in run_batch(module, rows)]


def epoch_metrics(module, records: list[dict]) -> dict[str, float]:
    """Gather every process's records, summarize, and return the flat metrics to log."""
    records = [r for part in dist.gather_objects(module, records) for r in part]
    result = summarize(records, module.trainer.datamodule.eval_specs)
    if not result["sets"]:
        return {}
    metrics = log_metrics(result)
    sets = result["sets"]
    avg_at_k = [next(v for m, v in s.items() if m.startswith("avg@")) for s in sets.values()]
    metrics["val/pass@1"] = sum(avg_at_k) / len(sets)
    if LEGACY_SET in sets and module.trainer.datamodule.legacy_validation:
        k = sets[LEGACY_SET]["k"]
        metrics[f"val/pass@{k}"] = sets[LEGACY_SET][f"pass@{k}"]
    return metrics


def _announce(step_label: str, metrics: dict[str, float]) -> None:
    parts = [f"{k[4:]} = {v:.3f}" for k, v in metrics.items() if k.count("/") == 1]
    rank_zero_info(f"[flowtracer] {step_label}: validation {', '.join(parts)}")


def on_validation_epoch_end(module, records: list[dict]) -> None:
    metrics = epoch_metrics(module, records)
    if not metrics:
        return
    module.log_dict(metrics, prog_bar=False)
    module.log("val_acc", metrics["val/pass@1"], prog_bar=True, logger=False)
    if not module.trainer.sanity_checking:
        module.val_history.append((module.rl_step, float(metrics["val/pass@1"])))
        _announce(f"step {module.rl_step}", metrics)


def before_training(module) -> dict[str, float]:
    """Validation outside Lightning's loop (before the first update): the metrics, or {}."""
    loader = module.trainer.datamodule.val_dataloader()
    rank, world = dist.rank_world(module.trainer)
    batches = list(loader) if loader is not None else []
    records = [r for i, rows in enumerate(batches) if i % world == rank for r in run_batch(module, rows)]
    metrics = epoch_metrics(module, records)
    if metrics:
        module.val_history.append((0, float(metrics["val/pass@1"])))
        _announce("before training", metrics)
    return metrics
