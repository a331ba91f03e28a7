"""Evaluation by benchmark (Lightning-free): metrics as a torchmetrics Metric (avg@k, unbiased
pass@k, maj@k, macro average), the engine that generates and verifies, and the result tables."""

from flowtracer.config import EvalSet
from flowtracer.evaluation.engine import benchmark_metric, eval_batch, evaluate, summarize
from flowtracer.evaluation.metrics import BenchmarkAccuracy, answer_key, majority_correct, pass_at_k

__all__ = ["BenchmarkAccuracy", "EvalSet", "answer_key", "benchmark_metric", "eval_batch", "evaluate",
           "majority_correct", "pass_at_k", "summarize"]
