"""User map functions (`data.map: toy_maps:<name>`) for the data tests: each takes one record and
returns the fields to add or replace."""


def flatten(row: dict) -> dict:
    """The nested fixture (tests/fixtures/data/nested.jsonl) as question / answer / meta."""
    return {"question": row["problem"]["text"], "answer": row["solution"]["final"],
            "meta": {"topic": row["problem"]["topic"], "steps": len(row["solution"]["steps"])}}


def shout(row: dict) -> dict:
    """The question (field "question", else "q") upper-cased, as "question": a visible change."""
    return {"question": (row["question"] if "question" in row else row["q"]).upper()}


def broken(row: dict) -> dict:
    """Fails on the record whose answer is 3 (a user bug the error must locate)."""
    if str(row.get("a")) == "3":
        raise KeyError("missing_key")
    return {}


def not_a_dict(row: dict):
    return row["q"]
