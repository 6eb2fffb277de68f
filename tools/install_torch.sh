#!/usr/bin/env bash
# Install PyTorch into the course's virtualenv, if it has none: `make lab` and `make test` call this.
#
#     bash tools/install_torch.sh .venv/bin/python
#
# With an NVIDIA GPU (nvidia-smi on PATH) the default index gives the CUDA build. Without one, the
# CUDA build would be several GB of NVIDIA libraries that never run, so PyTorch's CPU-only index is
# tried first (a few hundred MB); if it cannot be reached, pip gives up within seconds (short
# timeout, no retries) and the default index is used instead. Either way the last line says which
# build was installed. A torch that is already there is kept: install your own build first to choose.
set -euo pipefail
python=${1:?usage: install_torch.sh PATH/TO/VENV/bin/python}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
report='import torch; print(f"torch {torch.__version__}:", f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build")'

if "$python" -c 'import torch' 2>/dev/null; then
    echo "PyTorch is already installed, kept: $("$python" -c "$report")"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi found: installing PyTorch with CUDA from the default index"
    "$python" -m pip install torch
else
    echo "no nvidia-smi (no NVIDIA GPU): installing PyTorch's CPU-only build from $cpu_index"
    if ! "$python" -m pip install --timeout 5 --retries 0 --index-url "$cpu_index" torch; then
        echo "could not install from $cpu_index; falling back to the default index (on Linux this is the"
        echo "CUDA build, several GB: to avoid it, install a CPU build yourself first, see the README)"
        "$python" -m pip install torch
    fi
fi
echo "installed $("$python" -c "$report")"
