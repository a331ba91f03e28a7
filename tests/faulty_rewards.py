"""Toy user reward functions (`data.verifier: faulty_rewards:<name>`): ones that misbehave, for the
bad-input tests, and ones that give a random tiny model answers, for the training and probe tests."""

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


def fifth_char(response: str, reference) -> Score:
    """The 5th character is the answer (any text of 5+ characters has one), so a random tiny model's
    greedy responses get answer spans with 4 reasoning tokens before them (one char per token)."""
    if len(response) < 5:
        return Score(0.0, None, None)
    return Score(float(response[4] == str(reference)[:1]), (4, 5), response[4])
