"""README and docs/ say only what the checkout has: every path they name exists, every dotted
`flowtracer.*` name imports, every command they show names a real subcommand, config and option,
and the cheap ones run as written."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest
from conftest import ROOT

from flowtracer.cli import SUBCOMMANDS, main

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("flowtracer/", "experiments/", "results/", "benchmarks/", "scripts/", "tests/", "data/", "docs/", "examples/")
PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./*{},-]*[\w*}])")
DOTTED = re.compile(r"(?<![\w./])(flowtracer(?:\.[A-Za-z_]\w*)+)")
README_LIMIT = 12_000
# git-ignored: folders a run creates (named in the docs as where output goes), files a user brings
RUNTIME = ("data/cache", "data/local/math_benchmarks.jsonl")


def _text(page) -> str:
    return page.read_text(encoding="utf-8")


def _commands(page) -> list[str]:
    """Command lines of the page's ```bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", _text(page), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _expand(path: str) -> list[str]:
    """`data/chains_{train,val}.jsonl` -> both names."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",") for x in _expand(path[:m.start()] + alt + path[m.end():])]


def test_readme_is_a_front_door():
    n = len(_text(ROOT / "README.md"))
    assert n <= README_LIMIT, f"README.md has {n} characters; move detail into docs/ (limit {README_LIMIT})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_path_exists(page):
    missing = []
    for raw in sorted(set(PATH.findall(_text(page)))):
        for path in _expand(raw.rstrip(".,")):
            if "*" in path:
                if not list(ROOT.glob(path)):
                    missing.append(path)
            elif not (ROOT / path).exists() and not list(ROOT.glob(path + ".*")) and path not in RUNTIME:
                missing.append(path)  # (a PREFIX such as results/probe_chains counts when PREFIX.* exists)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_dotted_name_imports(page):
    bad = sorted({d for d in DOTTED.findall(_text(page)) if not _resolves(d.rstrip("."))})
    assert not bad, f"{page.name} names modules or objects that do not exist: {bad}"


def _flowtracer_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for line in _commands(page):
            words = shlex.split(line.replace("~", "$HOME"))
            while words and ("=" in words[0] and not words[0].startswith("-") or words[0] in ("nice", "-n", "5")):
                words = words[1:]  # env assignments and `nice -n 5`
            if words and words[0] == "flowtracer":
                out.append((page.name, words[1:]))
    return out


def test_every_flowtracer_command_names_a_real_subcommand_and_config():
    bad = []
    for page, args in _flowtracer_commands():
        if not args or args[0] not in SUBCOMMANDS and args[0] not in ("--help", "--version"):
            bad.append(f"{page}: flowtracer {' '.join(args)}")
            continue
        for flag, value in zip(args, args[1:]):
            if flag == "--config" and not (ROOT / value).exists():
                bad.append(f"{page}: --config {value} does not exist")
    assert not bad, "\n".join(bad)


def test_the_help_of_every_documented_subcommand_runs(capsys):
    """The cheap commands, run as written: `flowtracer --help` and `<subcommand> --help` for each one shown."""
    used = sorted({args[0] for _, args in _flowtracer_commands() if args and args[0] in SUBCOMMANDS})
    for sub in ["--help", *used]:
        argv = [sub] if sub == "--help" else [sub, "--help"]
        try:
            code = main(argv)
        except SystemExit as done:  # argparse and LightningCLI exit after printing their help
            code = done.code
        out = capsys.readouterr().out
        assert code in (0, None), f"flowtracer {' '.join(argv)} exited with {code}"
        assert "usage" in out.lower(), f"flowtracer {' '.join(argv)} printed no usage: {out[:300]}"
