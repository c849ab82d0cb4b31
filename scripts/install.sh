#!/usr/bin/env bash
# Install ctm (distribution ctm-merge) into the current Python, editable, from this checkout.
#
#   bash scripts/install.sh          # ctm + what scripts/demo.py needs (transformers, peft)
#   bash scripts/install.sh --dev    # ctm + test and lint tools (pytest, hypothesis, ruff)
#
# torch is installed first, and only when no torch is importable: by default the CPU build
# torch==2.13.0. An existing torch (e.g. a CUDA build) is kept. To choose another one:
#   CTM_TORCH_SPEC="torch==2.13.0" CTM_TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
# PYTHON selects the interpreter (default python3).
set -euo pipefail

extra="demo"
for arg in "$@"; do
    case "$arg" in
        --dev) extra="dev" ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg (expected --dev)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
pip=("$python" -m pip install -q --disable-pip-version-check)

if "$python" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    spec="${CTM_TORCH_SPEC:-torch==2.13.0}"
    echo "install.sh: no torch found; installing $spec"
    # shellcheck disable=SC2086  # CTM_TORCH_PIP_ARGS is a list of pip flags
    "${pip[@]}" ${CTM_TORCH_PIP_ARGS:-} "$spec"
fi

echo "install.sh: installing ctm-merge[$extra] (editable) from $(pwd)"
"${pip[@]}" -e ".[$extra]"
echo "install.sh: done; try: ctm --help"
