"""Options several commands share: one definition of what each accepts."""

from __future__ import annotations

from tmconvert.converter.data.calibration import CALIB_LIMIT
from tmconvert.converter.errors import ConfigError

SEEDS = range(2**63)  # non-negative and within int64: what torch's and numpy's generators both accept

CALIB_HELP = (
    f"N seeded noise images (N <= {CALIB_LIMIT}), or images as --data takes them: a folder, fashion-mnist[:ROOT] "
    f"(train split), synthetic:N, each with [START:STOP] or not (the first {CALIB_LIMIT} are read)."
)


def check_seed(seed: int) -> None:
    if seed not in SEEDS:
        raise ConfigError(f"--seed {seed}: out of range; choose 0 to {SEEDS[-1]}")
