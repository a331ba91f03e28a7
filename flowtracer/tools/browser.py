"""Load a local HTML page in headless Chromium: the DOM after its scripts ran, every console
message (an uncaught exception is one), an optional screenshot, the page's own render time.

    result = load("run/view.html", screenshot="view.png")
    result.raise_on_errors()          # one line naming the messages, if any
    console, seconds = take_screenshot("run/view.html", "view.png")   # the PNG alone

Chromium comes from the system (`apt-get install chromium`; FLOWTRACER_CHROMIUM names another
binary). Console messages are read from Chromium's log (--enable-logging=stderr), which prints
each as `...:CONSOLE:<line>] "<message>", source: <url> (<line>)`; the log does not carry the
level, so any message counts (flowtracer's pages write none).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flowtracer.errors import UserError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
_CONSOLE = re.compile(r':CONSOLE[:(]\d*\)?\] "(.*)", source: (.*)$')


class BrowserError(UserError):
    """No Chromium, or a page that logged console messages or did not render."""


def chromium() -> str:
    path = os.environ.get("FLOWTRACER_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if not path:
        raise BrowserError("no Chromium found; install it (apt-get install chromium) or set FLOWTRACER_CHROMIUM "
                           "to a Chromium or Chrome binary")
    return path


@dataclass
class Loaded:
    url: str
    dom: str  # the serialized DOM after the page's scripts ran
    console: list[str]  # console messages (uncaught exceptions included), "message (source)"
    render_ms: float | None  # the page's own time from navigation to its first render (data-render-ms)
    seconds: float  # wall time of the whole browser run (start, load, dump, exit)

    def raise_on_errors(self) -> None:
        if self.console:
            raise BrowserError(f"{self.url}: {len(self.console)} console message(s): " + " | ".join(self.console[:5]))
        if self.render_ms is None:
            raise BrowserError(f"{self.url}: the page's script did not finish rendering (no data-render-ms)")


def _run(flags: list[str], url: str, size: tuple[int, int], timeout: float) -> tuple[str, list[str], float]:
    """(stdout, console messages, seconds) of one headless Chromium run on `url`, in a fresh profile."""
    with tempfile.TemporaryDirectory() as profile:
        args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        t0 = time.perf_counter()
        proc = subprocess.run(args + flags + [url], capture_output=True, timeout=timeout)
        seconds = time.perf_counter() - t0
    # bytes, decoded here: text mode would turn a "\r" inside the page's text into "\n"
    out, err = (b.decode("utf-8", errors="replace") for b in (proc.stdout, proc.stderr))
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited with {proc.returncode} on {url}: {err.strip()[-300:]}")
    console = [f"{m.group(1)} ({m.group(2)})" for line in err.splitlines() if (m := _CONSOLE.search(line))]
    return out, console, seconds


def load(path: str | Path, *, screenshot: str | Path | None = None, hash: str = "",
         size: tuple[int, int] = (1200, 1400), timeout: float = 120.0) -> Loaded:
    """Open `path` (a local file) in headless Chromium and read its DOM; `hash` (e.g. "mode=score") is
    appended to the URL; with `screenshot`, a second run saves a PNG of the window (its console too)."""
    url = Path(path).resolve().as_uri() + (f"#{hash}" if hash else "")
    dom, console, seconds = _run(["--dump-dom"], url, size, timeout)
    if screenshot:
        console += take_screenshot(path, screenshot, hash=hash, size=size, timeout=timeout)[0]
    ms = re.search(r'data-render-ms="(\d+)"', dom)
    return Loaded(url, dom, console, float(ms.group(1)) if ms else None, seconds)


def take_screenshot(path: str | Path, png: str | Path, *, hash: str = "", size: tuple[int, int] = (1200, 1400),
                    timeout: float = 120.0) -> tuple[list[str], float]:
    """(console messages, seconds): one Chromium run that loads `path` and saves the window as `png`."""
    url = Path(path).resolve().as_uri() + (f"#{hash}" if hash else "")
    _, console, seconds = _run([f"--screenshot={Path(png).resolve()}", "--hide-scrollbars"], url, size, timeout)
    return console, seconds
