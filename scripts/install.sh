#!/usr/bin/env bash
# Install ctm (distribution ctm-merge) into the current Python, editable, from this checkout.
#
#   bash scripts/install.sh          # ctm + what scripts/demo.py needs (transformers, peft)
#   bash scripts/install.sh --dev    # ctm + test, lint and type-check tools (pytest, hypothesis, ruff, mypy)
#
# torch is installed first, and only when no torch is importable; an existing torch (say a CUDA build) is
# kept. What `pip install torch==2.13.0` fetches depends on the machine: on Linux x86_64 PyPI serves the
# CUDA build (about 2.7 GB with its NVIDIA libraries), which GPU users want; macOS and Windows get their
# usual builds. On a Linux machine without a GPU, take PyTorch's CPU build (a few hundred MB) instead:
#   CTM_TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" bash scripts/install.sh
# CTM_TORCH_SPEC picks another torch (default torch==2.13.0); PYTHON the interpreter (default python3).
set -euo pipefail

extra="demo"
for arg in "$@"; do
    case "$arg" in
        --dev) extra="dev" ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg (expected --dev)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
pip=("$python" -m pip install --disable-pip-version-check)

if "$python" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    spec="${CTM_TORCH_SPEC:-torch==2.13.0}"
    echo "install.sh: no torch found; installing $spec ${CTM_TORCH_PIP_ARGS:-(from PyPI: the CUDA build on Linux x86_64, ~2.7 GB; see --help for the CPU-only build)}"
    # shellcheck disable=SC2086  # CTM_TORCH_PIP_ARGS is a list of pip flags
    "${pip[@]}" --progress-bar on ${CTM_TORCH_PIP_ARGS:-} "$spec"
fi

echo "install.sh: installing ctm-merge[$extra] (editable) from $(pwd)"
"${pip[@]}" -q -e ".[$extra]"
echo "install.sh: done; try: ctm --help"
