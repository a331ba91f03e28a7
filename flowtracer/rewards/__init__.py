"""Verifiers that score a response against a reference and locate its final answer span."""

from flowtracer.rewards.base import Score, Verifier, gradable, graded, safe_score
from flowtracer.rewards.countdown import CountdownVerifier
from flowtracer.rewards.extract import EXTRACTORS, extract_answer
from flowtracer.rewards.math_verifier import MathVerifier
from flowtracer.rewards.registry import VERIFIERS, VerifierCache, get_verifier
from flowtracer.rewards.rgym import ReasoningGymVerifier
from flowtracer.rewards.spans import char_span_to_token_mask, locate_question_span

__all__ = [
    "EXTRACTORS",
    "VERIFIERS",
    "CountdownVerifier",
    "MathVerifier",
    "ReasoningGymVerifier",
    "Score",
    "Verifier",
    "VerifierCache",
    "char_span_to_token_mask",
    "extract_answer",
    "get_verifier",
    "gradable",
    "graded",
    "locate_question_span",
    "safe_score",
]
