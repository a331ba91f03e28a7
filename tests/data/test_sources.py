"""The one data path: local files and generated tasks become a `datasets.Dataset`, then the
declarative step (filter, map, field mapping, chat system prompt); rows stay Arrow-backed until
drawn, and every bad input is one line naming the file and the row. Offline, seconds."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import ROOT, write_config
from tiny import tiny_tokenizer

from flowtracer.cli import main
from flowtracer.data import DataError, PromptDataModule, load_rows
from flowtracer.data.rows import Rows

NESTED = ROOT / "tests" / "fixtures" / "data" / "nested.jsonl"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tagged(n=9):
    return [{"q": f"What is {i} + 1?", "a": i + 1, "tag": ("x", "y", "z")[i % 3]} for i in range(n)]


def test_local_file_is_an_arrow_dataset_decoded_when_drawn(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _tagged())
    rows = load_rows(str(path), question_field="q", answer_field="a")
    assert isinstance(rows, Rows) and len(rows) == 9
    assert rows.dataset.cache_files  # memory-mapped from the datasets cache, not a Python list
    assert set(rows.dataset.column_names) == {"q", "a"}  # only the fields a row is made from are read
    assert rows.take([4, 0]) == [rows[4], rows[0]]
    assert rows[4] == {"question": "What is 4 + 1?", "answer": "5", "verifier": "math", "meta": {}}
    assert rows[-1] == rows[8] and rows[1:3] == [rows[1], rows[2]] and list(rows)[5] == rows[5]


def test_filter_dict_expression_and_size(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _tagged()))
    by_dict = load_rows(path, question_field="q", answer_field="a", filter={"tag": "y"})
    assert [r["answer"] for r in by_dict] == ["2", "5", "8"]
    several = load_rows(path, question_field="q", answer_field="a", filter={"tag": ["x", "z"]}, size=3)
    assert [r["answer"] for r in several] == ["1", "3", "4"]  # the size cap counts kept rows
    expr = load_rows(path, question_field="q", answer_field="a", filter="tag == 'z' and a > 3")
    assert [r["answer"] for r in expr] == ["6", "9"]
    with pytest.raises(DataError, match="'tags', not a field of .*d.jsonl .fields: q, a, tag"):
        load_rows(path, question_field="q", answer_field="a", filter={"tags": "y"})
    with pytest.raises(DataError, match="kept none of its 9 rows"):
        load_rows(path, question_field="q", answer_field="a", filter="tag == 'w'")
    with pytest.raises(DataError, match="not a Python expression"):
        load_rows(path, filter="tag ==")
    with pytest.raises(DataError, match="open.. is not available"):
        load_rows(path, filter="open('x') == 1")
    with pytest.raises(DataError, match="Lambda is not allowed"):
        load_rows(path, filter="(lambda: 1)() == 1")


def test_filtered_rows_are_named_by_their_line_in_the_file(tmp_path):
    rows = _tagged()
    del rows[7]["a"]  # file row 8 (line 9, after the blank line 5), the 3rd row tagged "y"
    lines = [json.dumps(r) for r in rows]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n")
    with pytest.raises(DataError) as err:
        load_rows(str(path), question_field="q", answer_field="a", filter={"tag": "y"})
    msg = str(err.value)
    assert f"{path}: row 8 (line 9) has no field 'a' (available: q, tag); set answer_field" in msg
    with pytest.raises(DataError, match="filter 'a > 3' failed on row 8 .line 9. .TypeError"):
        load_rows(str(path), question_field="q", answer_field="a", filter="a > 3")


def test_map_function_on_a_local_file(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _tagged()))
    rows = load_rows(path, answer_field="a", map="toy_maps:shout", filter={"tag": "x"})  # the map makes "question"
    assert [r["question"] for r in rows] == ["WHAT IS 0 + 1?", "WHAT IS 3 + 1?", "WHAT IS 6 + 1?"]
    again = load_rows(path, answer_field="a", map="toy_maps:shout", filter={"tag": "x"})
    assert again.dataset.cache_files == rows.dataset.cache_files  # datasets' cache: mapped once
    with pytest.raises(DataError, match=r"d.jsonl: data.map toy_maps:broken failed on row 3 \(line 3\) "
                                        r"\(KeyError: 'missing_key'\)"):
        load_rows(path, question_field="q", answer_field="a", map="toy_maps:broken")
    with pytest.raises(DataError, match="returned a str, not a dict"):
        load_rows(path, question_field="q", answer_field="a", map="toy_maps:not_a_dict")
    with pytest.raises(DataError, match="could not be imported"):
        load_rows(path, map="toy_maps:nope")
    with pytest.raises(DataError, match="must be 'package.module:function'"):
        load_rows(path, map="toy_maps")


def test_nested_dataset_loads_with_map_and_fails_in_one_line_without(tmp_path, capsys):
    rows = load_rows(str(NESTED), map="toy_maps:flatten", filter={"split": "train"})
    assert [(r["question"], r["answer"]) for r in rows] == [("What is 2 + 3?", "5"), ("What is 6 * 7?", "42")]
    assert rows[0]["meta"] == {"topic": "arithmetic", "steps": 1}
    with pytest.raises(DataError) as err:
        load_rows(str(NESTED))
    assert str(err.value) == (f"{NESTED}: row 1 (line 1) has no field 'question' (available: id, problem, "
                              "solution, split); set question_field to the right name")
    with pytest.raises(DataError) as err:
        load_rows(str(NESTED), question_field="problem", answer_field="solution")
    msg = str(err.value)
    assert "\n" not in msg and "field 'problem' holds objects, not text" in msg and "data.map" in msg
    # the same from the command line: one line, exit 2, nothing written
    cfg = write_config(tmp_path, "unused-model", steps=1)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(cfg), "--data.train_source", str(NESTED)])
    assert done.value.code == 2 and not (tmp_path / "logs").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowtracer: error:") and "has no field 'question'" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_map_and_filter_on_generated_tasks(tmp_path):
    chains = load_rows("chains", size=12, seed=1, filter="meta['depth'] == 3", map="toy_maps:shout")
    plain = load_rows("chains", size=12, seed=1)
    deep = [r for r in plain if r["meta"]["depth"] == 3]
    assert 0 < len(chains) == len(deep) < 12
    assert [r["question"] for r in chains] == [r["question"].upper() for r in deep]
    assert [r["answer"] for r in chains] == [r["answer"] for r in deep]
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    rg = load_rows("reasoning_gym:basic_arithmetic", size=20, seed=3, task_kwargs=kwargs, cache_dir=tmp_path,
                   filter="'+' in question", map="toy_maps:shout")
    assert 0 < len(rg) < 20 and all("+" in r["question"] and r["question"].isupper() for r in rg)
    assert all(r["verifier"] == "reasoning_gym" and isinstance(r["answer"], dict) for r in rg)


def test_chat_messages_give_the_system_prompt(tmp_path):
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 1 + 1?"}]
    rows = [{"prompt": "What is 1 + 1?", "ground_truth": "2", "tag": "t", "messages": json.dumps(chat)},
            {"prompt": "What is 2 + 2?", "ground_truth": "4", "tag": "t", "messages": chat[1:]}]
    path = str(_write_jsonl(tmp_path / "chat.jsonl", rows[:1]))
    got = load_rows(path, question_field="prompt", answer_field="ground_truth", messages_field="messages")
    assert got[0]["system_prompt"] == SYSTEM and got[0]["question"] == "What is 1 + 1?"
    as_list = _write_jsonl(tmp_path / "chat_list.jsonl", [{**rows[0], "messages": chat}, rows[1]])
    got = load_rows(str(as_list), question_field="prompt", answer_field="ground_truth", messages_field="messages")
    assert got[0]["system_prompt"] == SYSTEM and "system_prompt" not in got[1]  # no system turn: none
    bad = _write_jsonl(tmp_path / "bad_chat.jsonl", [rows[0], {**rows[1], "messages": "not json"}])
    with pytest.raises(DataError, match=r"bad_chat.jsonl: row 2 \(line 2\) field 'messages' is not a JSON list"):
        load_rows(str(bad), question_field="prompt", answer_field="ground_truth", messages_field="messages")


def test_formats_mixed_types_and_bad_files(tmp_path):
    (tmp_path / "d.csv").write_text("q,a\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n")
    (tmp_path / "d.json").write_text(json.dumps([{"q": "What is 1 + 1?", "a": 2}]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"q": "What is 1 + 1?", "a": 2}] * 2}))
    for name, n in (("d.csv", 2), ("d.json", 1), ("wrapped.json", 2)):
        rows = load_rows(str(tmp_path / name), question_field="q", answer_field="a")
        assert len(rows) == n and rows[0]["answer"] == "2" and rows[0]["question"] == "What is 1 + 1?"
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [{"q": "a", "a": 7}, {"q": "b", "a": "[-2, 7]"},
                                                    {"q": "c", "a": "0042"}])
    assert [r["answer"] for r in load_rows(str(mixed), question_field="q", answer_field="a")] == ["7", "[-2, 7]", "0042"]
    numbers = _write_jsonl(tmp_path / "numbers.jsonl", [{"q": 12, "a": "x"}, {"q": "13 + 1", "a": "y"}])
    assert [r["question"] for r in load_rows(str(numbers), question_field="q", answer_field="a")] == ["12", "13 + 1"]
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"question": "x", "answer": "1"}\n"just text"\n')
    with pytest.raises(DataError, match="scalar.jsonl: line 2 is a str, not an object with fields"):
        load_rows(str(scalar))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: could not be read as parquet"):
        load_rows(str(tmp_path / "broken.parquet"))
    with pytest.raises(DataError, match="set the environment variable"):
        load_rows("$FLOWTRACER_NO_SUCH_VARIABLE/x.jsonl")


def test_datamodule_filter_map_and_streamed_fingerprint(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _tagged(30)))
    dm = PromptDataModule(path, val_source=None, val_size=4, prompts_per_step=3, answer_field="a",
                          filter={"tag": ["x", "y"]}, map="toy_maps:shout")
    dm.setup()
    assert len(dm.train_rows) == 16 and len(dm.val_rows) == 4  # 20 kept rows: 4 carved for validation
    batch = dm.train_batch(0)
    assert len(batch) == 3 and all(r["question"].startswith("WHAT IS") for r in batch)
    assert [r["index"] for r in batch] == dm.train_indices(0)
    questions = [r["question"] for r in dm.train_rows]
    assert dm.state_dict()["fingerprint"] == hashlib.sha1(json.dumps(questions).encode()).hexdigest()
    assert not {r["question"] for r in dm.val_rows} & set(questions)


def test_eval_math_local_protocol_on_a_synthetic_copy(tmp_path):
    """experiments/eval/math_local.yaml on a file shaped like ROLL's math_benchmarks.jsonl (made-up
    problems): one file, three sets by tag, the file's own system prompt, the paper's protocol."""
    from flowtracer.tools.runs import instantiate, merged_configs

    rows = [{"id": str(i), "prompt": f"Problem {i}: what is {i} + {i}?", "ground_truth": str(2 * i), "tag": tag,
             "messages": json.dumps([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"Problem {i}: what is {i} + {i}?"}])}
            for i, tag in enumerate(["MATH-500"] * 5 + ["aime2024"] * 3 + ["aime2025"] * 2)]
    local = _write_jsonl(tmp_path / "math_benchmarks.jsonl", rows)
    cfg = yaml.safe_load((ROOT / "experiments" / "eval/math_local.yaml").read_text())
    for spec in cfg["data"]["eval_sets"].values():
        assert spec["source"] == "data/local/math_benchmarks.jsonl"
        spec["source"] = str(local)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    settings, data = instantiate(merged_configs([str(tmp_path / "local.yaml")]))
    data.setup_eval()
    assert {n: len(r) for n, r in data.eval_rows.items()} == {"aime24": 3, "aime25": 2, "math500": 5}
    specs = data.eval_specs
    assert specs["aime24"].k == specs["aime25"].k == 16 and specs["math500"].k in (None, 1)
    assert all(s.math for s in specs.values()) and specs["aime24"].pass_ks == [1, 16]
    row = data.eval_rows["aime25"][1]
    assert (row["question"], row["answer"], row["system_prompt"]) == (rows[9]["prompt"], "18", SYSTEM)
    text, (s, e) = data.format_eval_prompt(tiny_tokenizer(), row)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and text[s:e] == row["question"]
    assert text.count("boxed") == 1  # the file's prompt says it once; no second instruction
    assert settings.val_sampling.max_new_tokens >= 1024
