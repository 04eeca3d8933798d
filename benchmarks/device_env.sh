# Source on a GPU machine whose python already has torch + triton (no network, no pip install of this package):
# exposes the checkout under the `tmconvert.<folder>` import path without installing it.
#   source benchmarks/device_env.sh && python3 benchmarks/scan.py
_tm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/tmroot/tmconvert
for _d in converter kernels models mappings recipes; do ln -sfn "$_tm_root/$_d" "/tmp/tmroot/tmconvert/$_d"; done
export PYTHONPATH="/tmp/tmroot${PYTHONPATH:+:$PYTHONPATH}"
