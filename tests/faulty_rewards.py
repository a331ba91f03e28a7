"""User reward functions that misbehave, for the bad-input tests (`data.verifier: faulty_rewards:<name>`)."""

from itertools import count

from flowtracer.rewards import Score

_calls = count()


def mixed(response: str, reference) -> Score | str:
    """Cycles through: raise, return a non-number, a span no token covers, a fine score."""
    k = next(_calls) % 4
    if k == 0:
        raise ZeroDivisionError("reward bug")
    if k == 1:
        return "yes"
    if k == 2:
        return Score(1.0, (10**6, 10**6 + 1), "x")  # beyond the response: the answer span cannot be located
    return Score(0.0, None, None)


def varied(response: str, reference) -> float:
    """A well-behaved toy reward with spread (digits in the response, mod 3), so groups have advantages."""
    return (sum(c.isdigit() for c in response) % 3) / 2
