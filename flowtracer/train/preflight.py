"""Pre-flight checks: every input a user can get wrong is refused before anything is written.

`preflight(module, datamodule, world_size)` runs before `trainer.fit` (the CLI calls it from
`before_fit`; the module's `setup` calls it for programmatic use). It loads the data and the model,
then checks the settings, every row's reference answer, every prompt's length against the model's
context, the chat template and the credit arm's attention layers. Each failure raises
`ConfigError` with one message: what is wrong, where, and the setting that fixes it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from flowtracer.credit.base import UniformCredit
from flowtracer.data.sources import DataError
from flowtracer.errors import InputError
from flowtracer.generation import AUTO, ENGINES
from flowtracer.generation.fast import unsupported_reason
from flowtracer.generation.precision import SAMPLER_DTYPES, native_bf16
from flowtracer.generation.sampler import resolve_draw
from flowtracer.memory import planner
from flowtracer.memory.planner import RunSpec
from flowtracer.model.layers import resolve_layers
from flowtracer.rl.advantages import ADVANTAGE_MODES
from flowtracer.rl.dapo import OVERLONG_MODES
from flowtracer.rl.loss import AGGREGATIONS, IS_LEVELS
from flowtracer.runs.checkpoints import UnsafeCheckpointError, load_checkpoint_file
from flowtracer.train import precision as run_precision
from flowtracer.train.step.placement import check_callbacks

DTYPES = ("float32", "bfloat16")  # the weights' dtypes a run trains in (model.model_dtype)


class ConfigError(InputError):
    """A setting or input that cannot work; the message names the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_settings(module, datamodule, world_size: int = 1) -> None:
    """Value ranges and batch arithmetic of the model and data settings."""
    s, v, loss, opt = module.sampling, module.val_sampling, module.loss_cfg, module.optim

    for name, cfg in (("sampling", s), ("val_sampling", v)):
        _require(isinstance(cfg.num_generations, int) and cfg.num_generations >= 1,
                 f"model.{name}.num_generations = {cfg.num_generations}: must be a positive int")
        _require(cfg.max_new_tokens >= 1, f"model.{name}.max_new_tokens = {cfg.max_new_tokens}: must be >= 1")
        _require(cfg.temperature >= 0, f"model.{name}.temperature = {cfg.temperature}: must be >= 0 (0 = greedy)")
        _require(0 < cfg.top_p <= 1, f"model.{name}.top_p = {cfg.top_p}: must be in (0, 1] (1 = off)")
        _require(cfg.cache_implementation in (None, "dynamic", "static", "offloaded", "offloaded_static"),
                 f"model.{name}.cache_implementation = {cfg.cache_implementation!r}: use null (dynamic) or "
                 "'static' (or 'offloaded', 'offloaded_static')")
        _require(cfg.top_k >= 0, f"model.{name}.top_k = {cfg.top_k}: must be >= 0 (0 = off)")
        check_generation(name, cfg)
    check_dapo(module)
    g = s.num_generations
    _require(g >= 2, f"model.sampling.num_generations = {g}: GRPO needs >= 2 responses per prompt to "
                     "form a group (a group of 1 has no advantage); set model.sampling.num_generations: 8")
    _require(loss.advantage in ADVANTAGE_MODES,
             f"model.loss.advantage = {loss.advantage!r}: use one of {', '.join(ADVANTAGE_MODES)}")
    _require(loss.aggregation in AGGREGATIONS,
             f"model.loss.aggregation = {loss.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    _require(loss.eps_low >= 0 and loss.eps_high >= 0,
             f"model.loss.eps_low / eps_high = {loss.eps_low} / {loss.eps_high}: clip ranges must be >= 0")
    _require(loss.beta >= 0, f"model.loss.beta = {loss.beta}: the KL coefficient must be >= 0 (0 = off)")
    _require(loss.importance_sampling_level in IS_LEVELS,
             f"model.loss.importance_sampling_level = {loss.importance_sampling_level!r}: use one of "
             f"{', '.join(IS_LEVELS)}")
    _require(loss.entropy_coef >= 0,
             f"model.loss.entropy_coef = {loss.entropy_coef}: the entropy bonus must be >= 0 (0 = off)")
    _require(loss.tis_cap == 0 or loss.tis_cap >= 1,
             f"model.loss.tis_cap = {loss.tis_cap}: the importance-weight cap must be >= 1 (TRL, verl: 2-3), "
             "or 0 for no correction")
    _require(loss.beta == 0 or (module.lora is not None and module.lora.enabled),
             f"model.loss.beta = {loss.beta} needs LoRA (the reference is the model with adapters off); "
             "enable model.lora or set model.loss.beta: 0")
    _require(module.model_dtype in DTYPES,
             f"model.model_dtype = {module.model_dtype!r}: use float32 (the default) or bfloat16 (GPUs); float16 "
             "training needs loss scaling, which the GRPO step does not do")
    _require(opt.lr > 0, f"model.optim.lr = {opt.lr}: the learning rate must be > 0")
    _require(opt.ppo_epochs >= 1, f"model.optim.ppo_epochs = {opt.ppo_epochs}: must be >= 1")
    _require(opt.grad_clip >= 0, f"model.optim.grad_clip = {opt.grad_clip}: must be >= 0 (0 = off)")
    _require(opt.micro_batch_size >= 0,
             f"model.optim.micro_batch_size = {opt.micro_batch_size}: must be >= 0 (0 = whole mini-batch)")
    p = datamodule.prompts_per_step
    _require(p % world_size == 0,
             f"data.prompts_per_step = {p} is not divisible by the {world_size} processes (devices x nodes): "
             f"each process takes whole prompts; set data.prompts_per_step to a multiple of {world_size}")
    local = (p // world_size) * g
    _require(opt.mini_batches >= 1 and local % opt.mini_batches == 0,
             f"model.optim.mini_batches = {opt.mini_batches} does not divide the {local} rollouts of a step "
             f"(per process: {p // world_size} prompts x G={g}); pick a divisor of {local}")


def check_data_size(datamodule) -> None:
    """A step's prompts are distinct rows: prompts_per_step cannot exceed the training rows."""
    p, n = datamodule.prompts_per_step, len(datamodule.train_rows)
    _require(p <= n, f"data.prompts_per_step = {p}, but the training data {datamodule.train_source} has {n} rows, "
                     f"so every step would repeat rows; set data.prompts_per_step to at most {n}, or add rows")


def check_generation(name: str, cfg) -> None:
    """The chunking and engine knobs of one SamplingConfig (flowtracer.generation)."""

    size = cfg.generation_batch_size
    _require(size == "auto" or (isinstance(size, int) and size >= 0),
             f"model.{name}.generation_batch_size = {size!r}: use a row count >= 0 (0 = all rows) or auto")
    _require(cfg.generation_token_budget >= 0,
             f"model.{name}.generation_token_budget = {cfg.generation_token_budget}: must be >= 0 (0 = off)")
    _require(cfg.engine == AUTO or cfg.engine in ENGINES,
             f"model.{name}.engine = {cfg.engine!r}: use one of {AUTO}, {', '.join(ENGINES)}")
    _require(cfg.dtype in SAMPLER_DTYPES,
             f"model.{name}.dtype = {cfg.dtype!r}: use one of {', '.join(SAMPLER_DTYPES)} (the rollouts' precision)")
    try:  # the engines' own rule; "auto" counts as fast here (where it resolves to hf, that engine refuses)
        resolve_draw(cfg.draw, "fast" if cfg.engine in (AUTO, "fast") else cfg.engine)
    except ValueError as err:
        raise ConfigError(f"model.{name}: {err}") from None
    _require(not (cfg.engine == "hf_paged" and cfg.seed_per_prompt),
             f"model.{name}.engine = hf_paged samples with transformers' own sampler: set "
             f"model.{name}.seed_per_prompt: false or model.{name}.engine: hf")


def check_dapo(module) -> None:
    """DAPO knobs (flowtracer.rl.dapo)."""

    d = getattr(module, "dapo", None)
    if d is None:
        return
    _require(d.overlong in OVERLONG_MODES,
             f"model.dapo.overlong = {d.overlong!r}: use one of {', '.join(OVERLONG_MODES)}")
    _require(d.max_extra_rounds >= 0, f"model.dapo.max_extra_rounds = {d.max_extra_rounds}: must be >= 0")
    _require(0 <= d.overlong_buffer < module.sampling.max_new_tokens,
             f"model.dapo.overlong_buffer = {d.overlong_buffer}: must be in [0, max_new_tokens = "
             f"{module.sampling.max_new_tokens})")


def check_references(module, rows: list[dict], where: str) -> None:
    """Every row's verifier can grade here (its dependencies import and work: `check_ready`), and
    every row's reference answer is something that verifier can check (`check_reference`)."""
    ready: set[int] = set()
    for i, row in enumerate(rows):
        name = row.get("verifier", "math")
        try:
            verifier = module.verifiers(row)
        except (ValueError, TypeError, ImportError, AttributeError) as exc:
            raise ConfigError(f"{where} row {i + 1}: verifier {name!r} could not be built ({exc}); "
                              "set data.verifier to a registered name or 'module:function'") from exc
        if id(verifier) not in ready:  # once per verifier: grading must not silently change mid-run
            problem = getattr(verifier, "check_ready", lambda: None)()
            if problem:
                raise ConfigError(f"{where}: the {name!r} verifier cannot grade here: {problem}")
            ready.add(id(verifier))
        check = getattr(verifier, "check_reference", None)
        problem = check(row["answer"]) if check is not None else None
        if problem:
            q = row["question"][:60]
            raise ConfigError(f"{where} row {i + 1} (question {q!r}): the answer {str(row['answer'])[:60]!r} "
                              f"cannot be checked by the {name!r} verifier ({problem}); fix or drop that row")


def check_prompts(module, datamodule, rows: list[dict], where: str) -> None:
    """Chat template present when asked for, and prompt + response within the model's context."""
    tok = module.tokenizer
    context = _context_length(module.policy)
    budget = max(module.sampling.max_new_tokens, module.val_sampling.max_new_tokens)
    for i, row in enumerate(rows):
        try:
            text, _ = datamodule.format_prompt(tok, row["question"])
        except DataError as exc:
            raise ConfigError(f"{module.model_name}: {exc}") from exc
        if context is None:
            return  # nothing to compare against; the template was checked on the first row
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n + budget > context:
            raise ConfigError(
                f"{where} row {i + 1}: the prompt is {n} tokens and responses may take {budget} more, "
                f"beyond the model's context of {context} tokens ({module.model_name}); lower "
                "model.sampling.max_new_tokens, shorten data.instruction/system_prompt, or drop long rows")


def check_capture_layers(module, callbacks) -> None:
    """Attention layers a credit arm asks for must exist in the model."""
    n = _num_layers(module.policy)
    for cb in callbacks:
        if not getattr(cb, "needs_attention", False) or n is None:
            continue
        try:
            resolve_layers(cb.capture_layers, n)
        except ValueError as exc:
            raise ConfigError(f"trainer.callbacks {type(cb).__name__}: {exc}") from exc


def check_checkpoint(path: str) -> None:
    """`--ckpt_path` must be a Lightning checkpoint file. Checked before LightningCLI reads its
    hyper-parameters (a torch.load traceback otherwise) and before a run folder is opened."""

    fix = ("pass a checkpoint a run wrote (<save_dir>/<name>/version_N/checkpoints/last.ckpt), "
           "--ckpt_path last for the newest one of this run name, or no --ckpt_path to start fresh")
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt_path {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}; {fix}")
    try:  # mmap: the tensors are not read, so a large checkpoint costs nothing here
        ckpt = load_checkpoint_file(path, mmap=True)
    except UnsafeCheckpointError as exc:
        raise ConfigError(f"--ckpt_path {exc}") from exc
    except Exception as exc:  # a text file, a truncated zip, a pickle of other objects...
        raise ConfigError(f"--ckpt_path {path} is not a checkpoint (torch.load: {type(exc).__name__}); {fix}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"--ckpt_path {path} is a torch file but not a Lightning checkpoint (no state_dict); {fix}")


_WHY = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is on a full disk",
        errno.EDQUOT: "is over the disk quota", errno.EACCES: "is not writable by this user",
        errno.EPERM: "is not writable by this user"}


def unwritable(path: str | os.PathLike) -> str | None:
    """Why folder `path` could not be created or written to, else None. Probed for real: a folder
    and a small file are made (and removed) in the nearest existing folder, since `os.access` says
    yes to root for /proc, read-only mounts and full disks alike."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        probe = Path(tempfile.mkdtemp(prefix=".flowtracer-probe-", dir=p))
    except OSError as exc:
        return f"{p} {_WHY.get(exc.errno, f'cannot hold a new folder ({exc.strerror})')}"
    try:
        with (probe / "probe").open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so when the block is allocated
    except OSError as exc:
        return f"{p} {_WHY.get(exc.errno, f'cannot hold a new file ({exc.strerror})')}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None


def check_writable(places: list[tuple[str, str]]) -> None:
    """Each (config key, folder) of a run's outputs can be written: found before training, not after step 1."""
    for key, path in places:
        problem = unwritable(path)
        if problem:
            raise ConfigError(f"{key} = {path}: {problem}; point it at a folder this user can write")


def check_credit_callbacks(callbacks, loss=None) -> None:
    """At most one arm sets token weights; the callbacks agree on one attention layer selection;
    the arm composes with `loss.importance_sampling_level` (plain GSPO takes uniform credit only)."""

    try:
        check_callbacks(callbacks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if loss is not None and loss.importance_sampling_level == "sequence":
        arms = [type(cb).__name__ for cb in callbacks if cb.sets_weights and not isinstance(cb, UniformCredit)]
        _require(not arms, f"model.loss.importance_sampling_level = sequence (GSPO) gives each response one ratio and "
                           f"one advantage, so the per-token weights of {arms[0] if arms else ''} cannot act: use "
                           "importance_sampling_level: sequence_token (GSPO-token), or the UniformCredit arm")


def preflight(module, datamodule, world_size: int = 1, callbacks=(), device=None, precision=None) -> None:
    """All checks, in the order a user would fix them: settings, data, model, prompts, layers, memory.

    `precision` is the trainer's (e.g. "bf16-mixed"): with it the rollouts' `sampling.dtype` is
    resolved (flowtracer.train.precision) and kept as `module.run_precision`."""
    check_settings(module, datamodule, world_size)
    check_credit_callbacks(callbacks, module.loss_cfg)
    datamodule.setup("fit")
    module.configure_model()
    check_precision(module, precision, device)
    for split, rows in (("training data", datamodule.train_rows), ("validation data", datamodule.val_rows)):
        src = datamodule.train_source
        if not split.startswith("training"):
            src = datamodule.val_source or datamodule.train_source
        check_references(module, rows, f"{split} {src}")
        check_prompts(module, datamodule, rows, f"{split} {src}")
    check_data_size(datamodule)
    check_capture_layers(module, callbacks)
    check_memory(module, datamodule, world_size, callbacks, device)  # also resolves generation_batch_size: auto


def check_precision(module, precision, device) -> None:
    """Resolve the rollouts' precision; an engine that cannot report the sampler's log-probs is
    refused where the sampler's numerics differ from the learner's."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    run = run_precision.apply(module, precision, device)
    module.run_precision = run
    if run.mixed and device.type == "cpu" and native_bf16(device) is None:
        warnings.warn(f"trainer.precision {precision} on a CPU without AVX512-BF16 or AMX: bf16 is emulated here "
                      "and slower than float32; set trainer.precision: 32-true", stacklevel=2)
    for name, cfg in (("sampling", module.sampling), ("val_sampling", module.val_sampling)):
        reason = unsupported_reason(module.policy) if cfg.engine == "fast" else None
        _require(reason is None, f"model.{name}.engine = fast cannot run this model: {reason}; "
                                 f"set model.{name}.engine: auto (or hf)")
    _require(not (run.record and module.sampling.engine == "hf_paged"),
             f"model.sampling.engine = hf_paged cannot report the sampler's log-probs, which {run.learner} with "
             f"{module.sampling.dtype} rollouts needs (truncated importance sampling); set model.sampling.dtype "
             "to the weights' dtype with trainer.precision 32-true, or use engine hf")


def _config(model):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None


def _context_length(model) -> int | None:
    cfg = _config(model)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _num_layers(model) -> int | None:
    n = getattr(_config(model), "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def check_memory(module, datamodule, world_size: int = 1, callbacks=(), device=None) -> None:
    """The planner's peak (flowtracer.memory.planner) must fit the device; resolves `generation_batch_size: auto`.

    Device: CUDA = its total memory; CPU = the RAM shared by the processes of this node
    (FLOWTRACER_MEMORY_GB overrides both). The message names the setting to change.
    """



    if module.policy is None or getattr(module.policy, "config", None) is None:
        return
    if device is None:
        trainer = getattr(module, "_trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    device = torch.device(device)
    shape = planner.shape_from_config(module.policy.config)
    rows = (datamodule.train_rows or [])
    texts = [datamodule.format_prompt(module.tokenizer, r["question"])[0] for r in rows]
    prompt_tokens = max((len(x) for x in module.tokenizer(texts, add_special_tokens=False)["input_ids"]), default=1)
    budget = planner.device_memory(device) / (world_size if device.type == "cpu" else 1)
    run = memory_runspec(module, datamodule.prompts_per_step // max(world_size, 1), prompt_tokens, callbacks, device)
    p = planner.plan(shape, run, budget)
    if isinstance(module.sampling.generation_batch_size, str):
        module.sampling = dataclasses.replace(module.sampling, generation_batch_size=p.generation_rows)
    v = module.val_sampling
    if isinstance(v.generation_batch_size, str):  # validation: val_batch_size prompts x k samples
        val = dataclasses.replace(run, rollouts=datamodule.val_batch_size * v.num_generations,
                                  num_generations=v.num_generations, max_new_tokens=v.max_new_tokens)
        rows = planner.auto_rows(shape, val, budget, sum(planner.resident_bytes(shape, val)))
        module.val_sampling = dataclasses.replace(v, generation_batch_size=rows)
    if p.peak > budget:
        raise ConfigError(f"the planned peak memory is {p.peak / planner.GIB:.1f} GiB in phase {p.peak_phase!r}, "
                          f"more than the {budget / planner.GIB:.1f} GiB of {device.type}: "
                          f"{planner.memory_fix(shape, run, p, budget)} (see `flowtracer plan --config ...`)")


def memory_runspec(module, prompts: int, prompt_tokens: int, callbacks, device):
    """The planner's view of a module's settings (per process)."""

    s, o, lora = module.sampling, module.optim, module.lora
    enabled = lora is not None and lora.enabled
    return RunSpec(
        rollouts=prompts * s.num_generations, num_generations=s.num_generations, prompt_tokens=prompt_tokens,
        max_new_tokens=s.max_new_tokens, dtype=module.model_dtype, lora_r=lora.r if enabled else None,
        lora_targets=tuple(lora.target_modules) if enabled else (),
        gradient_checkpointing=module.gradient_checkpointing, micro_batch_size=o.micro_batch_size,
        mini_batches=o.mini_batches, logits_budget_mb=module.logits_budget_mb,
        needs_attention=any(getattr(cb, "needs_attention", False) for cb in callbacks),
        generation_batch_size=s.generation_batch_size, generation_token_budget=s.generation_token_budget,
        accelerator=torch_device_type(device), **precision_spec(module))


def precision_spec(module) -> dict:
    """The planner's view of the run's precisions (flowtracer.train.precision): rollouts in another
    dtype than the weights', and autocast."""
    run = getattr(module, "run_precision", None)
    if run is None:
        return {}
    weights = run_precision.weights_dtype(module.policy)
    return {"sampler_dtype": None if run.sampler == weights else str(run.sampler).removeprefix("torch."),
            "autocast": run.mixed}


def torch_device_type(device) -> str:
    return "cpu" if str(device).startswith("cpu") else "cuda"
