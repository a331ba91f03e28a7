"""Every input a user can get wrong: one `flowtracer: error:` line naming the fix, exit 2, nothing written.

Plus the inputs a run survives: a reward function that raises or returns a non-number (scored 0,
counted) and an answer span that cannot be located (uniform fallback, counted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, write_config
from tiny import tiny_model, tiny_tokenizer

from flowtracer.cli import main


def broken_model_dirs(root: Path, good: str) -> dict[str, str]:
    """Model folders a user can get wrong, next to the good tiny one: no chat template, corrupted
    weights, no tokenizer files."""
    dirs = {"tiny": good, **{k: root / k for k in ("no_template", "bad_weights", "no_tokenizer")}}
    model = tiny_model("llama")
    model.save_pretrained(dirs["no_template"])
    tiny_tokenizer(chat_template=False).save_pretrained(dirs["no_template"])
    shutil.copytree(good, dirs["bad_weights"])
    (dirs["bad_weights"] / "model.safetensors").write_bytes(b"not safetensors" * 8)
    model.save_pretrained(dirs["no_tokenizer"])
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir):
    return broken_model_dirs(tmp_path_factory.mktemp("model_dirs"), tiny_model_dir)


def _file(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


def _arm(name: str, **init_args) -> list[str]:
    return ["--trainer.callbacks", json.dumps([{"class_path": f"flowtracer.credit.{name}", "init_args": init_args}])]


TWO_ARMS = json.dumps([{"class_path": "flowtracer.credit.FlowCredit"}, {"class_path": "flowtracer.credit.EntropyCredit"}])
FLOW_LAYERS_99 = json.dumps([{"class_path": "flowtracer.credit.FlowCredit", "init_args": {"layers": [0, 99]}}])

# case id -> (extra CLI args (a callable of tmp_path, model dirs), words the message must contain)
CASES = {
    "unknown key on the command line": (lambda t, m: ["--model.sampling.temprature", "0.5"], ["temprature", "--help"]),
    "unknown key in a YAML file": (lambda t, m: ["--config", _file(t, "extra.yaml", "model:\n  bogus_knob: 1\n")], ["bogus_knob"]),
    "wrong type: int": (lambda t, m: ["--model.sampling.num_generations", "abc"], ["num_generations", "int"]),
    "wrong type: float": (lambda t, m: ["--model.optim.lr", "fast"], ["lr"]),
    "missing dataset file": (lambda t, m: ["--data.train_source", str(t / "nope.jsonl")], ["nope.jsonl", "does not exist"]),
    "empty dataset": (lambda t, m: ["--data.train_source", _file(t, "empty.jsonl", "\n")], ["empty.jsonl", "empty"]),
    "row missing the question": (lambda t, m: ["--data.train_source", _file(t, "noq.jsonl", '{"question": "1+1?", "answer": "2"}\n{"answer": "3"}\n')], ["noq.jsonl", "row 2", "question_field"]),
    "row missing the answer": (lambda t, m: ["--data.train_source", _file(t, "noa.jsonl", '{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')], ["noa.jsonl", "row 2", "answer_field"]),
    "unparsable answer": (lambda t, m: ["--data.train_source", _file(t, "bad_answer.jsonl", '{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "(("}\n')], ["bad_answer.jsonl", "row 2", "cannot be checked"]),
    "empty answer": (lambda t, m: ["--data.train_source", _file(t, "blank.jsonl", '{"question": "1+1?", "answer": " "}\n')], ["blank.jsonl", "row 1", "empty answer"]),
    "invalid JSON line": (lambda t, m: ["--data.train_source", _file(t, "broken.jsonl", '{"question": "1+1?", "answer": "2"}\n{"question": \n')], ["broken.jsonl", "line 2", "not valid JSON"]),
    "answer not a countdown puzzle": (lambda t, m: ["--data.verifier", "countdown"], ["countdown", "cannot be checked"]),
    "unknown verifier": (lambda t, m: ["--data.verifier", "nope"], ["nope", "valid names"]),
    "reward function not importable": (lambda t, m: ["--data.verifier", "no_such_module:fn"], ["no_such_module", "could not be imported"]),
    "model path does not exist": (lambda t, m: ["--model.model", str(t / "no_such_model")], ["no_such_model", "local folder"]),
    "model folder without config.json": (lambda t, m: ["--model.model", str(t)], ["config.json"]),
    "no chat template": (lambda t, m: ["--model.model", m["no_template"]], ["chat template", "use_chat_template"]),
    "prompt longer than the context": (lambda t, m: ["--model.sampling.max_new_tokens", "600"], ["context of 512", "max_new_tokens"]),
    "G = 1": (lambda t, m: ["--model.sampling.num_generations", "1"], ["num_generations", ">= 2"]),
    "mini-batches do not divide the batch": (lambda t, m: ["--model.optim.mini_batches", "3"], ["mini_batches", "divisor"]),
    "two arms that set weights": (lambda t, m: ["--trainer.callbacks", TWO_ARMS], ["FlowCredit, EntropyCredit", "keep one"]),
    "layer range outside the model": (lambda t, m: ["--trainer.callbacks", FLOW_LAYERS_99], ["layers", "out of range", "0..5"]),
    "negative learning rate": (lambda t, m: ["--model.optim.lr", "-0.1"], ["optim.lr", "> 0"]),
    "negative temperature": (lambda t, m: ["--model.sampling.temperature", "-1"], ["temperature", ">= 0"]),
    "unknown KV cache kind": (lambda t, m: ["--model.sampling.cache_implementation", "paged"], ["cache_implementation", "static"]),
    "top_p of 0": (lambda t, m: ["--model.sampling.top_p", "0"], ["top_p", "(0, 1]"]),
    "unknown aggregation": (lambda t, m: ["--model.loss.aggregation", "sum"], ["aggregation", "token-mean"]),
    "KL without LoRA": (lambda t, m: ["--model.loss.beta", "0.1", "--model.lora", "null"], ["beta", "LoRA"]),
    "resume with no checkpoint": (lambda t, m: ["--ckpt_path", "last"], ["last.ckpt", "without --ckpt_path"]),
    "unknown generation engine": (lambda t, m: ["--model.sampling.engine", "vllm"], ["sampling.engine", "hf"]),
    "negative generation batch": (lambda t, m: ["--model.sampling.generation_batch_size", "-2"], ["generation_batch_size", "auto"]),
    "unknown overlong mode": (lambda t, m: ["--model.dapo.overlong", "cut"], ["dapo.overlong", "penalty"]),
    "zero skip budget": (lambda t, m: ["--model.optim.max_consecutive_skips", "0"], ["max_consecutive_skips", ">= 1"]),
    "credit arm: top_frac above 1": (lambda t, m: _arm("FlowCredit", top_frac=1.5), ["FlowCredit", "top_frac = 1.5", "[0, 1]"]),
    "credit arm: negative gamma": (lambda t, m: _arm("RandomCredit", gamma=-1), ["RandomCredit", "gamma = -1", ">= 0"]),
    "credit arm: unknown layer preset": (lambda t, m: _arm("FlowCredit", layers="middlish"), ["FlowCredit", "'middlish'", "'middle'"]),
    "attention arm: unknown layer preset": (lambda t, m: _arm("AttentionCredit", layers="middlish"), ["AttentionCredit", "'middlish'", "'middle'"]),
    "credit arm: unknown option": (lambda t, m: _arm("FlowCredit", top_fraction=0.5), ["top_fraction", "not accepted", "--trainer.callbacks.help"]),
    "credit arm: unknown class": (lambda t, m: _arm("FlowCrdit"), ["FlowCrdit", "FlowCredit"]),
    "ckpt_path is a text file": (lambda t, m: ["--ckpt_path", _file(t, "notes.ckpt", "step 3 looked good\n")], ["notes.ckpt", "not a checkpoint", "last.ckpt"]),
    "ckpt_path does not exist": (lambda t, m: ["--ckpt_path", str(t / "logs/tiny/version_0/checkpoints/last.ckpt")], ["last.ckpt", "does not exist", "--ckpt_path last"]),
    "model folder with corrupted weights": (lambda t, m: ["--model.model", m["bad_weights"]], ["bad_weights", "weights could not be read", "save_pretrained"]),
    "model folder without tokenizer files": (lambda t, m: ["--model.model", m["no_tokenizer"]], ["no_tokenizer", "no tokenizer files", "tokenizer.save_pretrained"]),
}




@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, model_dirs, capsys, monkeypatch):
    extra, words = CASES[case]
    cfg = write_config(tmp_path, model_dirs["tiny"], steps=1)
    monkeypatch.chdir(tmp_path)  # Lightning's default folders (lightning_logs/) would land here
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(cfg), *extra(tmp_path, model_dirs)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flowtracer: error:"), err[-3:]
    assert not any(line.startswith("Traceback") for line in err)
    for word in words:
        assert word in err[-1], (word, err[-1])
    # nothing written: no run folder, config, metrics or checkpoint, in the save_dir or the cwd
    assert not (tmp_path / "logs").exists() and not (tmp_path / "lightning_logs").exists()


def test_faulty_reward_and_unlocatable_span_are_counted_and_the_run_goes_on(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, verifier="faulty_rewards:mixed")
    arm = [{"class_path": "flowtracer.credit.FlowCredit", "init_args": {}}]
    cfg_data = yaml.safe_load(cfg.read_text())
    cfg_data["trainer"]["callbacks"] = arm
    cfg.write_text(yaml.safe_dump(cfg_data))
    main(["fit", "--config", str(cfg), "--model.val_before_training", "false"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        m = metrics[step]
        # 8 rollouts a step cycle raise / non-number / 1.0 with an unlocatable span / 0.0 without a span
        assert m["reward/errors"] == 4.0 and m["reward/mean"] == 0.25  # the 2 located-elsewhere 1.0s
        assert m["answer/no_span"] == 8.0 and m["credit/fallback_frac"] == 1.0
    assert (run / "checkpoints" / "last.ckpt").exists()
