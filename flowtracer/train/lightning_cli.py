"""fit, validate and sft: LightningCLI over the GRPO (or SFT) module and its data module.

    flowtracer fit --config experiments/quickstart.yaml
    flowtracer fit --config experiments/quickstart.yaml --trainer.max_steps 4 --model.seed 1
    flowtracer fit --config experiments/quickstart.yaml --print_config
    flowtracer fit --config experiments/quickstart.yaml --ckpt_path last   # resume the latest run
    flowtracer sft --config experiments/sft/chains.yaml                   # supervised warm start

A run writes under lightning_logs/<name>/version_N/: config.yaml (resolved), metrics.csv,
rollouts.jsonl and checkpoints/. A resumed run (`--ckpt_path last`, or a path inside a run folder)
continues in the folder of its checkpoint: metrics.csv and rollouts.jsonl go on where the
checkpoint left them (flowtracer.runs.checkpoints). Errors a user can cause end in one line naming
the fix, exit status 2, and are found before anything is written (flowtracer.train.preflight).
"""

from __future__ import annotations

import glob
import os
import re

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from flowtracer import credit
from flowtracer.credit.base import RolloutCallback
from flowtracer.data import PromptDataModule
from flowtracer.errors import fail, run_or_fail
from flowtracer.runs.checkpoints import StepCheckpoint
from flowtracer.train.config_hints import config_hint
from flowtracer.train.console import StepProgressBar, quiet_warnings
from flowtracer.train.module import GRPOModule
from flowtracer.train.preflight import ConfigError, check_checkpoint, check_writable, preflight
from flowtracer.train.sft import SFTDataModule, SFTModule
from flowtracer.train.trainer_options import check_trainer_options

# Config loggers of these classes get flowtracer's crash-safe drop-in (same arguments).
_CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger", "CSVLogger")
_SAFE_CSV = "flowtracer.runs.csvlog.CSVLogger"
# --ckpt_path values that name no file: ours ("last" = newest of this run name) and Lightning's
_CKPT_KEYWORDS = ("last", "best", "hpc")


def _default_loggers(name: str = "run") -> list[dict]:
    loggers = [{"class_path": _SAFE_CSV,
                "init_args": {"save_dir": "lightning_logs", "name": name}}]
    try:
        import tensorboard  # noqa: F401  (optional: the TensorBoard logger only where it is installed)

        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "lightning_logs", "name": name}})
    except ImportError:
        pass
    return loggers


class FlowtracerCLI(LightningCLI):
    """LightningCLI with flowtracer's defaults: CSV (+TensorBoard) logs, last.ckpt, a step progress bar."""

    manual_optimization = True  # the GRPO module: Trainer options are mapped or refused accordingly

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test/predict are not offered: `flowtracer test` is `flowtracer eval` (per-benchmark
        # evaluation of a checkpoint or model folder), and a policy has nothing to "predict".
        full = LightningCLI.subcommands()
        return {k: full[k] for k in ("fit", "validate")}

    command_names = {"fit": "fit", "validate": "validate"}  # Lightning subcommand -> what the user typed

    def __init__(self, *args, **kwargs) -> None:
        argv = kwargs.get("args")
        # The subcommand this run names (argv starts with it, flowtracer/cli.py): only its parser is built.
        self._run_only = argv[0] if isinstance(argv, list) and argv and argv[0] in self.subcommands() else None
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser, **kwargs) -> None:
        # Each subcommand's parser is the whole Trainer/model/data signature (jsonargparse): building
        # the one that does not run cost every start 0.05-0.1 s here (results/test_suite_time.md, round 3).
        full = type(self).subcommands()
        if self._run_only is not None:
            self.subcommands = lambda: {self._run_only: full[self._run_only]}  # for Lightning's loop only
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            self.__dict__.pop("subcommands", None)
        for name, sub in self._subcommand_parsers.items():  # usage: `flowtracer sft`, not "flowtracer [options] fit"
            sub.prog = f"flowtracer {self.command_names.get(name, name)}"

    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable under `checkpoint.*` / `progress_bar.*`; `trainer.callbacks` stays
        # free for the credit arm, so swapping arms in YAML never drops checkpointing.
        # StepCheckpoint = ModelCheckpoint that saves once the step's logs are on disk (crash-safe resume)
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1,
                             "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(StepProgressBar, "progress_bar")  # step k of max_steps, s/step, time left

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI torch.loads the checkpoint for its hyper-parameters and before the
        # trainer opens a run folder; `last` is resolved (and checked) in before_instantiate_classes.
        sub = self.config.get(self.config.get("subcommand") or "")
        path = sub.get("ckpt_path") if sub is not None else None
        if path is not None and path not in _CKPT_KEYWORDS and not str(path).startswith("registry"):
            check_checkpoint(str(path))

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path last` resumes the newest checkpoint of this run name.
        sub = self.config.get(self.subcommand) if self.subcommand else None
        if sub is None:
            return
        for note in check_trainer_options(sub, self.manual_optimization):
            rank_zero_info(f"[flowtracer] {note}")
        check_writable(_output_folders(sub))
        if sub.get("ckpt_path") == "last":
            sub["ckpt_path"] = _latest_checkpoint(sub)
            check_checkpoint(sub["ckpt_path"])
        for lg in _loggers(sub):
            if lg.get("class_path") in _CSV_LOGGERS:
                lg["class_path"] = _SAFE_CSV
        _ensure_csv_logger(sub)
        if self.subcommand == "validate":  # its own run name: no checkpoint-less version_N among the training runs
            rank_zero_info(f"[flowtracer] validate writes under {_validate_run_name(sub)}")
        elif sub.get("ckpt_path"):
            _continue_run_folder(sub)
        if sub.get("ckpt_path"):
            note = _resume_precision(sub)
            if note:
                rank_zero_info(f"[flowtracer] {note}")
        _share_version(sub)

    def instantiate_classes(self) -> None:
        # An arm's (or the model's) own ValueError reaches us wrapped in jsonargparse's union report
        # (every subtype it tried, the whole value); show the one line of the class that raised it.
        # Lightning refuses some Trainer settings itself (a device count this machine lacks, ...).
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:
            raise ConfigError(f"trainer: {err}") from err
        except ValueError as err:
            raise _init_error(err) from err

    def before_fit(self) -> None:
        # Every input check runs here, before Lightning writes config.yaml or opens a log folder.
        cbs = [cb for cb in self.trainer.callbacks]
        preflight(self.model, self.datamodule, self.trainer.world_size, _rollout_callbacks(cbs),
                  device=self.trainer.strategy.root_device, precision=self.trainer.precision)
        self.model.preflight_done = True


def _init_error(err: BaseException) -> BaseException:
    """The innermost cause of a jsonargparse instantiation error, prefixed with the config key and
    class whose __init__ raised it; jsonargparse's own errors (a value of the wrong type for a
    class) keep their text. A ValueError while the config's objects are built is a config error."""
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    frames = []
    tb = inner.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if inner is err or not frames or "jsonargparse" in frames[-1].f_code.co_filename:
        return ConfigError(" ".join(str(err).split()))
    owner = next((f.f_locals["self"] for f in frames if f.f_code.co_name == "__init__" and "self" in f.f_locals), None)
    return ConfigError(f"{_config_key(owner)}: {inner}")


def _config_key(obj) -> str:
    name = type(obj).__name__
    for cls, key in ((Callback, "trainer.callbacks"), (LightningModule, "model"), (LightningDataModule, "data")):
        if isinstance(obj, cls):
            return f"{key} {name}"
    return name if obj is not None else "config"


def _config_message(text: str) -> str:
    """One line for a jsonargparse error. For a class given by class_path (a credit arm), its
    union report (every subtype tried, the whole value) shrinks to the reason that class gave."""
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if "Problem with given class_path" in ln), None)
    if at is None:
        return (" ".join(text.split()) + " (run `flowtracer fit --help` or --print_config to see every key "
                "and its type)")
    key = re.search(r'Parser key "([^"]+)"', text)
    class_path = re.search(r"class_path '([^']+)'", lines[at]).group(1)
    depth = len(lines[at]) - len(lines[at].lstrip())
    reason = []
    for ln in lines[at + 1:]:
        if len(ln) - len(ln.lstrip()) <= depth:
            break
        reason.append(ln.strip())
    where, reason = key.group(1) if key else "config", " ".join(reason)
    if "has no attribute" in reason or "No module named" in reason:
        arms = ", ".join(n for n in credit.__all__ if n.endswith("Credit") and n != "ScoreCredit")
        return f"{where} {class_path}: {reason}; check the class_path (credit arms: flowtracer.credit.{{{arms}}})"
    return f"{where} {class_path}: {reason} (its options: `flowtracer fit --{where}.help {class_path}`)"


HELP = ("flowtracer: RLVR with FlowTracer token credit. Lightning subcommands: fit, validate; sft (supervised "
        "warm start, fit's flags). Tools (each with --help): eval (alias test: per-benchmark avg@k / pass@k / "
        "maj@k of a checkpoint or model), export (checkpoint -> PEFT adapter or merged HF model), plan (memory "
        "per phase before launch), grid, trace, probe, attribution.")


def _rollout_callbacks(callbacks):
    return [cb for cb in callbacks if isinstance(cb, RolloutCallback)]


def _loggers(cfg) -> list:
    loggers = cfg["trainer"].get("logger") or []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg for lg in loggers if hasattr(lg, "get") and lg.get("init_args") is not None]


def _output_folders(cfg) -> list[tuple[str, str]]:
    """(config key, folder) of everything a run writes: each logger's save_dir, checkpoint.dirpath."""
    out = [(f"trainer.logger {lg.get('class_path', '').rsplit('.', 1)[-1]} save_dir",
            str(lg["init_args"].get("save_dir") or "lightning_logs")) for lg in _loggers(cfg)]
    if cfg.get("checkpoint.dirpath"):
        out.append(("checkpoint.dirpath", str(cfg["checkpoint.dirpath"])))
    if cfg["trainer"].get("default_root_dir"):
        out.append(("trainer.default_root_dir", str(cfg["trainer"]["default_root_dir"])))
    model = cfg.get("model")
    export = model.get("export_dir") if hasattr(model, "get") else None
    if export:  # sft's merged model, written at the end: refused now, not after the last step
        out.append(("model.export_dir", str(export)))
    return out


def _ensure_csv_logger(cfg) -> None:
    """metrics.csv in every run: a config whose loggers (TensorBoard, W&B, MLflow, ...) include no
    CSV logger gets the crash-safe one first, in the first logger's save_dir/name (so the run folder,
    rollouts.jsonl and checkpoints stay where that logger puts them). `logger: false` stays off."""
    loggers = cfg["trainer"].get("logger")
    if loggers in (None, True, False) or (isinstance(loggers, list) and not loggers):
        return  # the defaults (which include it), or logging switched off
    listed = loggers if isinstance(loggers, list) else [loggers]
    if any(hasattr(lg, "get") and lg.get("class_path") == _SAFE_CSV for lg in listed):
        return
    first = next((lg.get("init_args") for lg in listed if hasattr(lg, "get") and lg.get("init_args")), None) or {}
    args = {"save_dir": first.get("save_dir") or "lightning_logs", "name": first.get("name") or "run"}
    if isinstance(first.get("version"), int):  # a folder version (W&B's is a run id string)
        args["version"] = first["version"]
    cfg["trainer"]["logger"] = [{"class_path": _SAFE_CSV, "init_args": args}, *listed]


def _share_version(cfg) -> None:
    """Loggers with the same save_dir/name (CSV + TensorBoard) write into one version_N folder.

    Each logger would otherwise pick "the next free version" on its own, and the second one to
    look finds the first one's folder already made (CSV in version_0, TensorBoard in version_1).
    Only the launching process pins it; DDP's other ranks do not write logs.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    groups: dict[str, list] = {}
    for lg in _loggers(cfg):
        args = lg["init_args"]
        # only folder-versioned loggers: W&B's `version` is a run id, MLflow has none
        if str(lg.get("class_path")).endswith(("CSVLogger", "TensorBoardLogger")) and "save_dir" in args:
            root = os.path.join(str(args.get("save_dir") or "lightning_logs"), str(args.get("name") or ""))
            groups.setdefault(os.path.realpath(root), []).append(args)
    for root, members in groups.items():
        if len(members) < 2 or any(a.get("version") is not None for a in members):
            continue
        used = [int(d[len("version_"):]) for d in (os.listdir(root) if os.path.isdir(root) else [])
                if d.startswith("version_") and d[len("version_"):].isdigit()]
        for a in members:
            a["version"] = max(used, default=-1) + 1


def _validate_run_name(cfg) -> str:
    """Loggers write `validate` results under <name>_validate (not beside the training run's versions)."""
    where = []
    for lg in _loggers(cfg):
        args = lg["init_args"]
        if "name" in args or str(lg.get("class_path")).endswith(("CSVLogger", "TensorBoardLogger")):
            args["name"] = f"{args.get('name') or 'run'}_validate"
            where.append(os.path.join(str(args.get("save_dir") or "lightning_logs"), args["name"]))
    return ", ".join(dict.fromkeys(where)) or "the loggers' folders"


def _continue_run_folder(cfg) -> None:
    """Resume into the run folder that holds the checkpoint (<save_dir>/<name>/version_N/checkpoints/),
    so metrics.csv and rollouts.jsonl continue instead of starting a new version_N+1."""
    ckpt = os.path.realpath(str(cfg["ckpt_path"]))
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    version = os.path.basename(run_dir)
    for lg in _loggers(cfg):
        args = lg["init_args"]
        if args.get("version") is not None or not version.startswith("version_"):
            continue
        root = os.path.realpath(os.path.join(str(args.get("save_dir", "lightning_logs")), str(args.get("name") or "")))
        if os.path.dirname(run_dir) == root and version[len("version_"):].isdigit():
            args["version"] = int(version[len("version_"):])


# Lightning's short precision names, as the long ones they mean
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _resume_precision(cfg) -> str | None:
    """A resumed run keeps the trainer.precision it was trained with (the config.yaml beside its
    checkpoints/) unless the command sets one; a different one set is said. Returns the note."""
    run_dir = os.path.dirname(os.path.dirname(os.path.realpath(str(cfg["ckpt_path"]))))
    saved = os.path.join(run_dir, "config.yaml")
    try:
        with open(saved) as f:
            run = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None  # a checkpoint outside a run folder: nothing recorded to keep
    def name(p) -> str:
        return _PRECISION_ALIASES.get(str(p), str(p)) if p is not None else "32-true"

    was, now = (run.get("trainer") or {}).get("precision"), cfg["trainer"].get("precision")
    if now is None and name(was) != "32-true":
        cfg["trainer"]["precision"] = was
        return (f"resuming with the run's trainer.precision = {name(was)} (from {saved}); "
                "pass --trainer.precision to change it")
    if now is not None and name(now) != name(was):
        return (f"warning: resuming a run trained with trainer.precision = {name(was)} in {name(now)} (set on "
                f"this command); the steps from here on use {name(now)}")
    return None


def _latest_checkpoint(cfg) -> str:
    first = next(iter(_loggers(cfg)), None)
    name = first["init_args"].get("name", "run") if first is not None else "run"
    save_dir = first["init_args"].get("save_dir", "lightning_logs") if first is not None else "lightning_logs"
    pattern = os.path.join(str(save_dir), str(name), "version_*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ConfigError(f"--ckpt_path last: no {pattern} yet; start the run without --ckpt_path")
    return found[-1]




def run_lightning_cli(cli_cls, module_cls, datamodule_cls, args: list[str] | None, name: str = "run") -> int:
    """LightningCLI with flowtracer's defaults; user errors end in one line and exit status 2."""
    trainer_defaults = {
        "logger": _default_loggers(name),
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
        # its FLOPs (0: nothing traced) and train-mode module counts say nothing here; the progress
        # bar prints the parameter counts instead (flowtracer.train.console)
        "enable_model_summary": False,
    }
    # exit_on_error=False: a bad key or type raises, and is reported below in one line instead of
    # jsonargparse's full usage text; allow_abbrev=False: `--trainer.max_step` is an unknown key,
    # not silently `--trainer.max_steps`
    strict = {"exit_on_error": False, "allow_abbrev": False}
    try:
        run_or_fail("flowtracer", lambda: cli_cls(
            module_cls, datamodule_cls, args=args, trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**strict, "description": HELP, **{c: strict for c in ("fit", "validate")}}))
    except ArgumentError as err:
        roots = {"model": module_cls, "data": datamodule_cls, "trainer": Trainer}
        hint = config_hint(str(err), list(args or []), roots)  # the file, and the key meant
        fail("flowtracer", err, f"config: {hint + '; ' if hint else ''}{_config_message(str(err))}")
    return 0


class SFTCLI(FlowtracerCLI):
    manual_optimization = False  # automatic optimisation: Lightning's clipping and accumulation apply
    command_names = {"fit": "sft"}  # `flowtracer sft` is Lightning's fit over SFTModule

    def before_fit(self) -> None:  # the RL preflight does not apply; the data module checks its rows
        self.datamodule.setup("fit")


def main(argv: list[str]) -> int:
    """`flowtracer fit|validate ...` (argv starts with the subcommand)."""
    quiet_warnings()
    return run_lightning_cli(FlowtracerCLI, GRPOModule, PromptDataModule, argv)


def sft_main(argv: list[str]) -> int:
    """`flowtracer sft ...`: LightningCLI's fit over SFTModule / SFTDataModule (same flags as fit)."""
    quiet_warnings()
    return run_lightning_cli(SFTCLI, SFTModule, SFTDataModule, ["fit", *argv], name="sft")
