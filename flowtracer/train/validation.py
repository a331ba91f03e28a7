"""Validation during `fit`, on the evaluation engine (flowtracer.evaluation).

The module's validation hooks delegate here: each validation batch (rows of one eval set) is
generated and verified by `eval_batch`, and its records update the module's `val_metric`, a
torchmetrics `BenchmarkAccuracy` (flowtracer.evaluation.metrics): only per-problem counts are
kept, and torchmetrics gathers them across processes when the epoch's metrics are computed (no
record or response text crosses processes). Logged: ``val/<set>/avg@k``, ``val/<set>/pass@k'``,
``val/<set>/maj@k``, ``val/math_avg`` (mean avg@k over the math sets), and for continuity
``val/pass@1`` = the mean avg@k over all sets (the one set's avg@k for an old config), plus
``val/pass@k`` of the old single validation set. Answers are graded as training grades them
(flowtracer.rewards.graded: a truncated response's last-number answer is refused), and the
refusals are logged as ``val/<set>/truncated_fallback``.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from flowtracer.config import LEGACY_SET
from flowtracer.evaluation.engine import benchmark_metric, eval_batch
from flowtracer.evaluation.metrics import BenchmarkAccuracy
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


def metric(module) -> BenchmarkAccuracy:
    """The module's validation metric over its datamodule's eval sets, on the module's device."""
    specs = module.trainer.datamodule.eval_specs
    if module.val_metric is None or module.val_metric.names != list(specs):  # (another datamodule)
        module.val_metric = benchmark_metric(specs).to(module.device)
    return module.val_metric


def validation_step(module, rows: list[dict]) -> None:
    """Generate, verify and count one batch into the epoch's metric."""
    metric(module).update(run_batch(module, rows))


def epoch_metrics(module) -> dict[str, float]:
    """The epoch's metrics over every process (torchmetrics syncs them), flat for logging; resets."""
    m = metric(module)
    result = m.compute()
    m.reset()
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
    refused = int(sum(v for k, v in metrics.items() if k.endswith("/truncated_fallback")))
    if refused:  # counted, and said: these answers were graded wrong although their last number may match
        parts.append(f"{refused} answers refused (cut off at max_new_tokens with no answer marker)")
    rank_zero_info(f"[flowtracer] {step_label}: validation {', '.join(parts)}")


def on_validation_epoch_end(module) -> None:
    metrics = epoch_metrics(module)
    if not metrics:
        return
    module.log_dict(metrics, prog_bar=False)  # already reduced over processes by torchmetrics
    module.log("val_acc", metrics["val/pass@1"], prog_bar=True, logger=False)
    if not module.trainer.sanity_checking:
        module.val_history.append((module.rl_step, float(metrics["val/pass@1"])))
        _announce(f"step {module.rl_step}", metrics)


def before_training(module) -> dict[str, float]:
    """Validation outside Lightning's loop (before the first update): the metrics, or {}."""
    loader = module.trainer.datamodule.val_dataloader()
    rank, world = dist.rank_world(module.trainer)
    for i, rows in enumerate(loader if loader is not None else []):
        if i % world == rank:
            validation_step(module, rows)
    metrics = epoch_metrics(module)
    if metrics:
        module.val_history.append((0, float(metrics["val/pass@1"])))
        _announce("before training", metrics)
    return metrics
