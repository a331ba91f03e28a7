"""How a user's mistake ends: one `<prog>: error:` line that names the fix, and exit status 2.

Only the project's own error types get that treatment: `UserError` and its subclasses (ConfigError
in flowtracer.train.preflight, DataError in flowtracer.data.sources, PolicyError in
flowtracer.model.policy, NumericalError in flowtracer.train.guards, and `InputError` here for the
arguments, settings and files of the tools). Anything else is a bug and shows its traceback. Running
out of memory gets its own line (`out_of_memory_message`): what to change, and the planner that says it.

FLOWTRACER_DEBUG=1 re-raises instead, to show the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake the user can fix; the message says how. Ends in one line and exit status 2."""


class InputError(UserError, ValueError):
    """An argument, setting or file that cannot work (a ValueError too, for callers that catch those)."""


OOM_FIX = ("lower model.sampling.generation_batch_size (or set it to auto), model.optim.micro_batch_size, "
           "or set model.gradient_checkpointing: true; `flowtracer plan --config <config>` predicts each "
           "phase's peak before launch")


def is_out_of_memory(err: BaseException) -> bool:
    """A device or host allocation failure (torch.OutOfMemoryError, CPU allocator failures, MemoryError)."""
    torch = sys.modules.get("torch")  # only loaded if the command used it; no import here
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text or "CUDA out of memory" in text))


def out_of_memory_message(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"out of memory ({first}); {OOM_FIX}"


def fail(prog: str, err: BaseException, message: str) -> NoReturn:
    """One `<prog>: error:` line and exit 2; FLOWTRACER_DEBUG=1 re-raises `err` (the traceback)."""
    if os.environ.get("FLOWTRACER_DEBUG"):
        raise err
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_or_fail(prog: str, entry, *args):
    """`entry(*args)`, with a UserError or an out-of-memory error ending in one line (exit 2)."""
    try:
        return entry(*args)
    except UserError as err:
        fail(prog, err, str(err))
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        fail(prog, err, out_of_memory_message(err))
