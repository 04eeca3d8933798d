"""Conversion cost on this machine: `tmconvert SRC --to vim-s` for a DeiT-B-shaped checkpoint, next to a plain
safetensors read + write of the same bytes, in the same run.

    .venv/bin/python benchmarks/convert_cost.py [--work /tmp/tmconvert-cost] [--repeats 3]

Each measured command runs in its own process; wall time is its elapsed time and peak RSS its `ru_maxrss` from
`os.wait4`, so the numbers of different commands do not mix. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLAIN_COPY = """
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
save_file(tensors, sys.argv[2])
"""

MAKE_SOURCE = """
import sys
from safetensors.torch import save_file
from tmconvert.models import build_model
model = build_model("deit-b", seed=0)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""


def measure(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS bytes) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/tmconvert-cost")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target", default="vim-s")
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "deit-b.safetensors"
    if not source.exists():
        subprocess.run([sys.executable, "-c", MAKE_SOURCE, str(source)], check=True)
    out = work / "vim-s.safetensors"
    copy = work / "copy.safetensors"
    tmconvert = [sys.executable, "-c", "import sys; from tmconvert.converter.cli import main; sys.exit(main())"]
    convert_cmd = [
        *tmconvert,
        str(source),
        "--to",
        args.target,
        "--layers",
        str(args.layers),
        "--out",
        str(out),
        "--no-verify",
        "--force",
    ]
    copy_cmd = [sys.executable, "-c", PLAIN_COPY, str(source), str(copy)]
    python_cmd = [sys.executable, "-c", "import torch, safetensors"]

    rows: dict[str, list[tuple[float, int]]] = {"convert": [], "plain read+write": [], "python+torch import": []}
    for _ in range(args.repeats):  # interleave so drift hits every command alike
        rows["plain read+write"].append(measure(copy_cmd))
        rows["convert"].append(measure(convert_cmd))
        rows["python+torch import"].append(measure(python_cmd))
    med = {k: (statistics.median(w for w, _ in v), max(r for _, r in v)) for k, v in rows.items()}
    src_mb, out_mb = source.stat().st_size / 2**20, out.stat().st_size / 2**20
    print(
        f"source {source.name}: {src_mb:.0f} MiB; output {out.name}: {out_mb:.0f} MiB; "
        f"{os.cpu_count()} CPUs; median of {args.repeats}"
    )
    print(f"{'command':<22}{'wall s':>9}{'peak RSS MiB':>14}")
    for k, (w, r) in med.items():
        print(f"{k:<22}{w:>9.2f}{r / 2**20:>14.0f}")
    ratio = med["convert"][0] / med["plain read+write"][0]
    budget = src_mb + out_mb + 300
    print(
        f"time ratio convert / plain = {ratio:.2f} (target <= 2); peak RSS {med['convert'][1] / 2**20:.0f} MiB "
        f"vs budget source + output + 300 = {budget:.0f} MiB"
    )
    print(
        json.dumps(
            {
                "source_mib": src_mb,
                "output_mib": out_mb,
                "median_s": {k: v[0] for k, v in med.items()},
                "peak_rss_mib": {k: v[1] / 2**20 for k, v in med.items()},
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
