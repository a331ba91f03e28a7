"""How a user's mistake ends: one `<prog>: error:` line that names the fix, and exit status 2.

FLOWTRACER_DEBUG=1 re-raises instead, to show the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError,
                                                RuntimeError)


def fail(prog: str, err: BaseException, message: str) -> NoReturn:
    """One `<prog>: error:` line and exit 2; FLOWTRACER_DEBUG=1 re-raises `err` (the traceback)."""
    if os.environ.get("FLOWTRACER_DEBUG"):
        raise err
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
