"""Toy reward functions for `data.rewards` (TRL's convention: lists in, one value per completion out).

tests/ is on sys.path in tests and their subprocesses: `fn: multi_rewards:has_tag`.
"""

import math

from flowtracer.rewards import Score


def has_tag(completions, **kwargs):
    """1.0 when the completion contains a complete <answer>...</answer> (a format reward)."""
    return [float("<answer>" in c and "</answer>" in c) for c in completions]


def digit_count(completions, question):
    """Digits in the completion, mod 3, halved (spread for a random tiny model); sees only what it names."""
    assert len(question) == len(completions)  # the row field arrives as a list, one entry per completion
    return [(sum(ch.isdigit() for ch in c) % 3) / 2 for c in completions]


def last_char(completions, **kwargs):
    """A Score whose span is the last non-space character (an answer span for a random tiny model)."""
    out = []
    for c in completions:
        s = c.rstrip()
        out.append(Score(float(len(s) % 2), (len(s) - 1, len(s)) if s else None, s[-1:] or None))
    return out


def uses_meta(completions, answer, meta, index, **kwargs):
    """1.0 when the completion contains the row's answer; checks that the row's fields arrive."""
    assert all(isinstance(m, dict) for m in meta) and all(isinstance(i, int) for i in index)
    return [float(str(a) in c) for c, a in zip(completions, answer)]


def raises_on_seven(completions, answer, **kwargs):
    """Raises on a row whose answer is 7 (only that row)."""
    if any(str(a) == "7" for a in answer):
        raise ZeroDivisionError("reward bug")
    return [0.0] * len(completions)


def nan_on_second(completions, **kwargs):
    return [math.nan if i == 1 else 0.0 for i in range(len(completions))]


def one_short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(completions, **kwargs):
    return ["yes"] * len(completions)


def needs_solution(completions, solution):
    return [0.0] * len(completions)


class Scaled:
    """A class entry: instantiated with the entry's kwargs, then called like a function."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, completions, **kwargs):
        return [self.scale * len(c) for c in completions]
