"""Evaluation by benchmark (Lightning-free): metrics (avg@k, unbiased pass@k, maj@k, macro
average), the engine that generates and verifies, and the result tables."""

from flowtracer.config import EvalSet
from flowtracer.evaluation.engine import eval_batch, evaluate, summarize
from flowtracer.evaluation.metrics import answer_key, avg_at_k, majority_correct, pass_at_k, set_metrics

__all__ = ["EvalSet", "answer_key", "avg_at_k", "eval_batch", "evaluate",
           "majority_correct", "pass_at_k", "set_metrics", "summarize"]
