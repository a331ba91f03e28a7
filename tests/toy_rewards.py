"""A toy reward with group variance and an answer span, so tiny random models get real updates.

`data.verifier: toy_rewards:digits` (tests/ is on sys.path in tests and their subprocesses).
"""

from flowtracer.rewards import Score


def digits(response: str, reference) -> Score:
    """Reward (number of digits mod 3) / 2; the answer span is the last non-space character.

    A random tiny model writes ~10% digits, so the rewards of a group of 4 almost always differ.
    """
    stripped = response.rstrip()
    span = (len(stripped) - 1, len(stripped)) if stripped else None
    return Score((sum(c.isdigit() for c in response) % 3) / 2, span, stripped[-1:] or None)
