"""Data sources, prompt formatting and the step-addressed PromptDataModule (offline, seconds)."""

from __future__ import annotations

import json

import pytest

from flowtracer.data import DataError, PromptDataModule, format_prompt, load_rows
from flowtracer.data.sources import REPO_ROOT
from tiny import tiny_tokenizer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n):
    return [{"q": f"What is {i} + 1?", "a": i + 1} for i in range(n)]


def test_jsonl_and_parquet_with_custom_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as papq

    jsonl = _write_jsonl(tmp_path / "d.jsonl", _rows(5))
    parquet = tmp_path / "d.parquet"
    papq.write_table(pa.Table.from_pylist(_rows(5)), parquet)
    for path in (jsonl, parquet):
        rows = load_rows(str(path), question_field="q", answer_field="a")
        assert rows[2] == {"question": "What is 2 + 1?", "answer": "3", "verifier": "math", "meta": {}}
        assert len(rows) == 5
    assert len(load_rows(str(jsonl), question_field="q", answer_field="a", size=2)) == 2


def test_gsm8k_answers_and_bundled_files():
    rows = load_rows("data/sample_math.jsonl")  # resolved under the repo root from any cwd
    assert rows and all("####" not in r["answer"] and "####" in r["meta"]["solution"] for r in rows)
    assert rows[0]["answer"] == rows[0]["meta"]["solution"].rsplit("####")[1].strip()
    total = sum(p.stat().st_size for p in (REPO_ROOT / "data").glob("*.jsonl"))
    assert total < 800_000  # the variable-chain splits (1400 rows with span ground truth) take ~630 KB


def test_missing_field_names_file_row_and_fields(tmp_path):
    rows = _rows(4)
    del rows[2]["a"]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(str(path), question_field="q", answer_field="a")
    msg = str(err.value)
    assert str(path) in msg and "row 3" in msg and "'a'" in msg and "available: q" in msg
    assert "answer_field" in msg


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="reasoning_gym:<task>"):
        load_rows("some_dataset_name")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_rows(str(bad))


def test_hub_dataset_offline_error(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE"):
        load_rows("hf:flowtracer-test/not-a-cached-dataset:main@train")


def test_reasoning_gym_deterministic_and_cached(tmp_path, monkeypatch):
    import reasoning_gym

    calls = []
    create = reasoning_gym.create_dataset
    monkeypatch.setattr(reasoning_gym, "create_dataset", lambda *a, **k: calls.append(a) or create(*a, **k))
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    a = list(load_rows("reasoning_gym:basic_arithmetic", size=20, seed=3, task_kwargs=kwargs, cache_dir=tmp_path))
    b = list(load_rows("reasoning_gym:basic_arithmetic", size=20, seed=3, task_kwargs=kwargs, cache_dir=tmp_path))
    assert a == b and len(a) == 20 and len(calls) == 1  # the second load read the datasets cache
    assert list(tmp_path.rglob("*.arrow"))
    fresh = list(load_rows("reasoning_gym:basic_arithmetic", size=20, seed=3, task_kwargs=kwargs,
                           cache_dir=tmp_path / "other"))
    assert fresh == a and len(calls) == 2  # generation itself is deterministic, not just the cache
    other = list(load_rows("reasoning_gym:basic_arithmetic", size=20, seed=4, task_kwargs=kwargs, cache_dir=tmp_path))
    assert other != a and len(calls) == 3
    row = a[0]
    assert row["verifier"] == "reasoning_gym" and row["meta"]["task"] == "basic_arithmetic"
    assert set(row["answer"]) == {"question", "answer", "metadata"} and row["answer"]["question"] == row["question"]
    assert reasoning_gym.get_score_answer_fn("basic_arithmetic")(row["answer"]["answer"], row["answer"]) == 1.0
    as_math = load_rows("reasoning_gym:basic_arithmetic", size=20, seed=3, task_kwargs=kwargs,
                        cache_dir=tmp_path, verifier="math")
    assert as_math[0]["answer"] == row["answer"]["answer"] and as_math[0]["verifier"] == "math"
    with pytest.raises(DataError, match="no_such_task"):
        load_rows("reasoning_gym:no_such_task", size=2, cache_dir=tmp_path)


def test_train_batch_deterministic_covers_epochs_and_wraps(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(10))
    dm = PromptDataModule(str(path), val_size=0, prompts_per_step=3, seed=7,
                          question_field="q", answer_field="a")
    assert dm.steps_per_epoch == 4
    again = PromptDataModule(str(path), val_size=0, prompts_per_step=3, seed=7,
                             question_field="q", answer_field="a")
    assert [again.train_batch(s) for s in (5, 0, 2)] == [dm.train_batch(s) for s in (5, 0, 2)]
    stream = [i for s in range(10) for i in dm.train_indices(s)]  # 30 rows = exactly 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh permutation each epoch
    assert dm.train_indices(3) == stream[9:12]  # step 3 straddles epochs 0 and 1
    batch = dm.train_batch(1)
    assert len(batch) == 3 and {"question", "answer", "verifier", "meta", "index"} <= set(batch[0])
    other_seed = PromptDataModule(str(path), val_size=0, prompts_per_step=3, seed=8,
                                  question_field="q", answer_field="a")
    assert other_seed.train_indices(0) + other_seed.train_indices(1) != stream[:6]
    assert list(dm.train_dataloader()) == [0, 1, 2, 3]


def test_val_carve_and_dataloader(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(10))
    dm = PromptDataModule(str(path), val_source=None, val_size=4, val_batch_size=3, question_field="q",
                          answer_field="a", verifier_kwargs={"extraction": ["last_number"]})
    dm.setup("fit")
    train_q = {r["question"] for r in dm.train_rows}
    val_q = [r["question"] for r in dm.val_rows]
    assert len(train_q) == 6 and len(val_q) == 4 and not train_q & set(val_q)
    assert all(r["verifier_kwargs"] == {"extraction": ["last_number"]} for r in [*dm.train_rows, *dm.val_rows])
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [3, 1] and batches[0][0]["question"] == val_q[0]
    with pytest.raises(DataError, match="val_size"):
        PromptDataModule(str(path), val_source=None, val_size=10, question_field="q",
                         answer_field="a").setup()


def test_generated_task_in_datamodule_and_resume_check(tmp_path):
    kw = dict(val_source=None, train_size=12, val_size=4, cache_dir=str(tmp_path), prompts_per_step=4,
              task_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    dm = PromptDataModule("reasoning_gym:basic_arithmetic", **kw)
    dm.setup()
    assert len(dm.train_rows) == 12 and len(dm.val_rows) == 4
    state = dm.state_dict()
    PromptDataModule("reasoning_gym:basic_arithmetic", **kw).load_state_dict(state)
    with pytest.raises(DataError, match="prompts_per_step"):
        PromptDataModule("reasoning_gym:basic_arithmetic", **{**kw, "prompts_per_step": 2}).load_state_dict(state)


def test_default_datamodule_is_the_quickstart():
    dm = PromptDataModule()
    dm.setup()
    assert len(dm.train_rows) == 80 and len(dm.val_rows) == 20
    assert dm.train_batch(0)[0]["verifier"] == "math"


def test_format_prompt_span_and_errors():
    tok = tiny_tokenizer()
    q = "What is 3 + 4?"
    text, (s, e) = format_prompt(tok, q, system_prompt="Be brief.", instruction="Answer in <answer></answer>.")
    assert text[s:e] == q and text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    text, (s, e) = format_prompt(tok, q, system_prompt=f"Example: {q}")  # last occurrence wins
    assert text[s:e] == q and s > text.index("user")
    text, (s, e) = format_prompt(tok, q, instruction="Q: {question}\nA:")
    assert text[s:e] == q and "Q: " + q + "\nA:" in text
    with pytest.raises(DataError, match="data.use_chat_template: false"):
        format_prompt(tiny_tokenizer(chat_template=False), q)
    text, span = format_prompt(tiny_tokenizer(chat_template=False), q, use_chat_template=False)
    assert text == q and span == (0, len(q))
    dm = PromptDataModule(instruction=None, system_prompt="Be brief.")
    assert dm.format_prompt(tok, q) == format_prompt(tok, q, system_prompt="Be brief.")
