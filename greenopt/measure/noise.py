"""The machine's noise floor: the spread between repeated A/A comparisons, stored per machine.

``greenopt calibrate`` (:mod:`greenopt.calibrate`) runs K A/A comparisons and :func:`save_floor`
keeps the result under ``$GREENOPT_HOME/calibration`` (or ``$GREENOPT_CALIBRATION``), keyed by
machine, meter, protocol and torch thread count. :func:`floor_for` is what every reported
comparison asks: the stored floor for its key, else, for an estimate (tier E1), the stated
conservative default :data:`DEFAULT_E1_FLOOR_LOG_SD`, else none (a counter that was never
calibrated says so instead of borrowing the estimate's figure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from greenopt._io import write_text
from greenopt.env import cpu_flags, machine
from greenopt.offline import home
from greenopt.records import NoiseFloor

log = logging.getLogger(__name__)

# The largest between-comparison spread this project has seen for one pair on a 2-core VM under
# the E1 estimate: 8 comparisons of one variant read EEI 88.1-107.1, sd 0.075 of log EEI
# (docs/BENCHMARKS.md); rounded up. A/A runs on such VMs read about 0.03 (docs/MEASUREMENT.md).
DEFAULT_E1_FLOOR_LOG_SD = 0.08
DEFAULT_E1_SOURCE = "uncalibrated default for an estimate on a shared VM; run greenopt calibrate"


@dataclass(frozen=True)
class FloorChoice:
    """The floor a comparison is widened by (0: none) and where it came from."""

    log_sd: float
    source: str | None


def calibration_dir() -> Path:
    """Where noise floors are kept: ``$GREENOPT_CALIBRATION`` or ``$GREENOPT_HOME/calibration``."""
    env = os.environ.get("GREENOPT_CALIBRATION")
    return Path(env) if env else home() / "calibration"


def floor_key(meter_name: str, protocol_id: str, threads: int) -> str:
    """The key a floor is stored under: a hash of machine, CPU flags, meter, protocol and threads."""
    raw = json.dumps([machine(), cpu_flags(), meter_name, protocol_id, threads])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _path(key: str) -> Path:
    return calibration_dir() / f"{key}.json"


def load_floor(meter_name: str, protocol_id: str, threads: int) -> NoiseFloor | None:
    """The stored floor for this machine, meter, protocol and thread count, or None.

    A stored file that no longer parses is logged and ignored (calibrate again to replace it).
    """
    path = _path(floor_key(meter_name, protocol_id, threads))
    try:
        return NoiseFloor.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as e:
        log.warning("ignoring unreadable noise floor %s (%s); run greenopt calibrate again", path, e)
        return None


def save_floor(floor: NoiseFloor) -> Path:
    """Writes ``floor`` atomically under its key; returns the path.

    Raises:
        WriteError: the calibration folder cannot be written.
    """
    path = _path(floor.key)
    write_text(path, floor.model_dump_json(indent=2) + "\n")
    return path


def stored_floors() -> tuple[NoiseFloor, ...]:
    """Every readable floor in :func:`calibration_dir`, oldest first."""
    out = []
    for p in sorted(calibration_dir().glob("*.json")):
        try:
            out.append(NoiseFloor.model_validate_json(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError):
            continue
    return tuple(sorted(out, key=lambda f: f.created))


def floor_for(meter_name: str, tier: str, protocol_id: str, threads: int) -> FloorChoice:
    """The noise floor a comparison under this meter, protocol and thread count is widened by.

    Args:
        meter_name: the meter's name (``rapl``, ``estimate``, ``nvml``...).
        tier: the comparison's tier; an uncalibrated ``E1`` gets :data:`DEFAULT_E1_FLOOR_LOG_SD`.
        protocol_id: e.g. ``GO-1/b1/p64-n32``.
        threads: torch's intra-op thread count during the measurement.

    Returns:
        The floor (sd of log EEI) and its source; ``log_sd`` 0 with source None when there is
        no floor (a counter tier never calibrated here).
    """
    stored = load_floor(meter_name, protocol_id, threads)
    if stored is not None:
        return FloorChoice(stored.log_sd, stored.source)
    if tier == "E1":
        return FloorChoice(DEFAULT_E1_FLOOR_LOG_SD, DEFAULT_E1_SOURCE)
    return FloorChoice(0.0, None)
