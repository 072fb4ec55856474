#!/usr/bin/env bash
# The two commands of the README, on a machine with only Python >= 3.10:
#
#   ./run.sh train [hydra overrides...]   # the main job: python -m recipes.train
#   ./run.sh test  [pytest arguments...]  # ruff, then the whole test suite: python -m pytest -q
#
# Both create (or reuse) the virtualenv .venv, install the torch build that fits the machine
# (scripts/torch_install.py: CPU wheels where there is no CUDA GPU) and the package with the extras the
# verb needs, then run. Reinstalling is skipped while pyproject.toml and the torch choice are unchanged,
# so a second call starts at once.
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (e.g. torch==2.13.0: pin the
# torch requirement), TORCH_INDEX_URL (a mirror of https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    echo "usage: ./run.sh train [hydra overrides...] | ./run.sh test [pytest arguments...]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
verb=$1
shift
case "${verb}" in
    train) extras=recipes ;;
    test) extras=dev ;;
    *) echo "run.sh: unknown verb '${verb}'." >&2; usage ;;
esac

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if ! "${PYTHON}" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "run.sh: ${PYTHON} is missing or older than Python 3.10 ($("${PYTHON}" --version 2>&1 || true))." \
         "Install Python >= 3.10 or point PYTHON at one, e.g. PYTHON=python3.11 ./run.sh ${verb}." >&2
    exit 2
fi

if [ ! -x "${VENV}/bin/python" ]; then
    echo "== creating virtualenv ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi
py="${VENV}/bin/python"

# torch first: a bare `torch` requirement from pyproject.toml would pull a multi-GB CUDA build on a CPU machine.
if ! "${py}" -c 'import torch' 2>/dev/null; then
    mapfile -t torch_args < <("${py}" scripts/torch_install.py)
    echo "== installing ${torch_args[*]}"
    "${py}" -m pip install -q "${torch_args[@]}"
fi

stamp="${VENV}/.stablelr-${extras}"
want="$("${py}" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' < pyproject.toml)"
if [ "$(cat "${stamp}" 2>/dev/null || true)" != "${want}" ]; then
    echo "== installing lightning-stablelr[${extras}] (editable)"
    "${py}" -m pip install -q -e ".[${extras}]"
    echo "${want}" > "${stamp}"
fi

export PATH="${PWD}/${VENV}/bin:${PATH}"
export MPLBACKEND="${MPLBACKEND:-Agg}"
case "${verb}" in
    train)
        exec "${py}" -m recipes.train "$@"
        ;;
    test)
        echo "== ruff"
        "${py}" -m ruff check lightning_stablelr recipes benchmarks tests scripts
        echo "== tests"
        set +e
        "${py}" -m pytest -q "$@"
        status=$?
        set -e
        if [ "${status}" -eq 5 ]; then
            echo "run.sh: pytest collected no tests: failing" >&2
            exit 1
        fi
        exit "${status}"
        ;;
esac
