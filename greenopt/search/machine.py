"""The search space as this machine can run it: what has no fast path or is not installed is left out.

When a run starts, :func:`space_for_machine` probes the kernels (``greenopt.runtimes.probe``,
a few seconds), keeps the probe in ``runs/NAME/kernels.json`` (a resumed run reuses it, so
the space cannot change under a study), and narrows the space's deployment dimensions:
a compute dtype the CPU has no native kernels for, or whose matmul is not faster than fp32
here, and a runtime whose package is missing are left out, each with the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError

from greenopt._io import write_json
from greenopt.config import Deploy, SpaceSpec
from greenopt.errors import ConfigError
from greenopt.records import KernelProbe
from greenopt.runtimes import runtime_class, unrealisable
from greenopt.runtimes.probe import fast_dtypes, probe_kernels

log = logging.getLogger(__name__)


def space_for_machine(space: SpaceSpec, device: str, kernels_path: Path) -> tuple[SpaceSpec, dict[str, str]]:
    """``space`` narrowed to what runs well on ``device``, and ``{left-out choice: why}``.

    Args:
        space: the requested space.
        device: ``cpu`` or ``cuda:N``; the probe runs on CPUs only (GPUs have native bf16/fp16).
        kernels_path: where the probe is kept; an existing file is reused instead of probing again.

    Returns:
        The narrowed space and the reasons, in the order of the space's fields.
    """
    probe = None
    if space.dtypes and not str(device).startswith("cuda"):
        probe = _load(kernels_path)
        if probe is None:
            probe = probe_kernels()
            write_json(kernels_path, probe.model_dump(mode="json"))
        for line in probe.lines():
            log.info("kernel probe: %s", line)
    left_out: dict[str, str] = {}
    dtypes = []
    for dtype in space.dtypes:
        reason = unrealisable(Deploy(dtype=dtype), (), device)
        if reason is None and probe is not None:
            reason = fast_dtypes(probe, (dtype,))[1].get(dtype)
        if reason:
            left_out[f"dtype {dtype}"] = reason
        else:
            dtypes.append(dtype)
    runtimes = []
    for name in space.runtimes:
        try:
            runtime_class(name)
            runtimes.append(name)
        except ConfigError as e:
            left_out[f"runtime {name}"] = str(e)
    for choice, why in left_out.items():
        log.warning("left out of the search space: %s: %s", choice, why)
    return space.model_copy(update={"dtypes": tuple(dtypes), "runtimes": tuple(runtimes)}), left_out


def _load(path: Path) -> KernelProbe | None:
    try:
        return KernelProbe.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as e:
        log.warning("ignoring unreadable %s (%s); probing again", path, e)
        return None
