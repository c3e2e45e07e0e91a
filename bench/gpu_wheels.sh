#!/usr/bin/env bash
# The wheels bench/gpu_run.py needs on the GPU machine (an H200 with CUDA torch 2.11, Python 3.12,
# and no package index) that its image lacks, into .whl/ (git-ignored), checked against the 64 MiB
# that the working tree and the carried paths may weigh together. Run in the repository root:
#
#     bash bench/gpu_wheels.sh            # then carry [".whl"] (bench/GPU.md has the command)
#
# What the image lacks was read from the device notes' package list against what the worker path
# imports (pydantic for the spec and configs; GPTQModel imports datasets, defuser, device-smi,
# logbar, pcre and tokenicer at import time; dill and multiprocess come with datasets):
# - binary wheels from PyPI (cp312, manylinux): pydantic, pydantic_core, annotated_types,
#   typing_inspection, torchao, bitsandbytes (its wheel holds libbitsandbytes_cuda130.so, the
#   build for the machine's CUDA 13.0 torch), datasets, dill, multiprocess;
# - sdist only on PyPI, pure Python, built here: gptqmodel 7.6.0 (its CUDA kernels are sources
#   that it JIT-compiles with nvcc on first use), defuser, device-smi, logbar, tokenicer;
# - pypcre 0.6.4: sdist only, a C extension: built here with a CPython 3.12 (PATH or pyenv), linked
#   to the system's libpcre2-8.so.0, which is copied to .whl/lib/ in case the image has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT=$((64 * 1024 * 1024))
DEST=.whl
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

git check-ignore -q "$DEST/x.whl" || { echo "$DEST/ is not git-ignored: add '$DEST/' to .gitignore" >&2; exit 1; }
rm -rf "$DEST" && mkdir -p "$DEST/lib"   # one version of each: two stop the whole install there

# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$DEST" \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
  torchao==0.18.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

# pure-Python sdists: any Python builds the same py3-none-any wheel (no build isolation: gptqmodel's
# setup reads torch, which the project's environment has)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  gptqmodel==7.6.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14

is312() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
PY312=${PY312:-$(command -v python3.12 2>/dev/null || true)}
if ! is312 "$PY312" && command -v pyenv >/dev/null; then  # a pyenv shim answers only for the selected version
  version=$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -1 || true)
  [ -n "$version" ] && PY312="$(pyenv root)/versions/$version/bin/python3.12"
fi
if ! is312 "$PY312"; then
  echo "no CPython 3.12 here to build pypcre's cp312 wheel: GPTQModel will not import there" >&2
  exit 1
fi
"$PY312" -m pip wheel -q --no-deps -w "$DEST" pypcre==0.6.4
pcre=$(ldconfig -p | awk '/libpcre2-8\.so\.0 .*x86-64/ {print $NF; exit}')
[ -n "$pcre" ] && cp -L "$pcre" "$DEST/lib/libpcre2-8.so.0"

# the working tree that travels: tracked files and untracked ones git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheels=$(find "$DEST" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
find "$DEST" -type f -printf '%s\t%p\n' | sort -n | awk -F'\t' '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
total=$((tree + wheels))
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT" 'BEGIN {
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB carry limit\n", w / 2^20, t / 2^20, (w + t) / 2^20, l / 2^20 }'
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the carry limit: drop a component (bench/gpu_run.py reports what it cannot import)" >&2
  exit 1
fi
