#!/usr/bin/env bash
# Create the project virtualenv and install lbllm with its dependencies.
#
# torch is chosen before anything else asks for it, because a plain `pip install torch`
# (or any package that depends on it) pulls several GB of CUDA wheels:
#   1. a torch the base Python already has is reused (the venv sees system site-packages);
#   2. with an NVIDIA driver (nvidia-smi), the default PyPI build (CUDA) is installed;
#   3. otherwise the CPU build: a local wheel if pip's find-links has one, else the
#      PyTorch CPU index.
# DeepSpeed builds from source against that torch, so it is installed without build
# isolation (an isolated build would download its own torch).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TIMM_VERSION=${TIMM_VERSION:-1.0.31}

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "setup: NVIDIA driver found, installing torch==$TORCH_VERSION (CUDA build)"
        $PIP install "torch==$TORCH_VERSION"
    elif $PIP install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        echo "setup: installed torch==$TORCH_VERSION (CPU) from a local wheel"
    else
        echo "setup: no GPU, installing torch==$TORCH_VERSION CPU build from $TORCH_CPU_INDEX"
        $PIP install "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
fi
$PIP install --no-build-isolation -e ".[dev]"
# timm is a test-only reference (tests/test_optim.py compares LAMB/LARS with timm.optim).
# --no-deps: timm depends on torchvision, which would pull a second multi-GB torch; the
# two optimizer files the tests load (tests/timm_ref.py) need only torch.
if $PIP install -q --no-deps "timm==$TIMM_VERSION"; then
    echo "setup: timm $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("timm"))') (no deps, test reference only)"
else
    echo "setup: WARNING: 'pip install --no-deps timm==$TIMM_VERSION' failed; the timm comparison tests will be skipped" >&2
fi
"$VENV/bin/python" -c "import torch, deepspeed, transformers; print('setup: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
