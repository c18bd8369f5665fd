"""Watts per busy core for the E1 estimate, from a CPU TDP table (CodeCarbon-style).

power per busy core = TDP of the CPU package / cores of that package.

The table (``cpu_tdp.csv`` beside this module) is CodeCarbon's ``cpu_power.csv`` trimmed to
Intel Xeon/Core and AMD EPYC/Ryzen rows (source and MIT licence in its header). The CPU's
name comes from ``/proc/cpuinfo`` and is matched after dropping the marks, clock and words
the table leaves out (``Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz`` -> ``Intel Xeon Gold 6338``).
Cores per package come from the table when it has them, else from the name
(``AMD EPYC 7763 64-Core Processor``), else from ``/proc/cpuinfo`` (``cpu cores``). Inside a
virtual machine the cores seen are vCPUs, not the chip's cores, so a TDP row without a core
count there falls back to the flat default, and the note says why.

    >>> cpu_watts_per_core("/proc/cpuinfo").note          # doctest: +SKIP
    'TDP table: Intel Xeon Gold 6338 205 W / 32 cores = 6.41 W/core (cores from /proc/cpuinfo)'
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from greenopt.measure.rapl import cpu_model_name

log = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).resolve().parent / "cpu_tdp.csv"
DEFAULT_WATTS_PER_CORE = 10.0  # mirrors estimate.DEFAULT_CPU_WATTS_PER_CORE (documented there)

_MARKS = re.compile(r"\((?:r|tm|c)\)|[®™]", re.I)
_CLOCK = re.compile(r"@.*$")
_NOISE = re.compile(r"\b\d+(?:st|nd|rd|th) gen\b|\b\d+-cores?\b|\bcpu\b|\bprocessor\b|\b(?:with|w/) radeon.*$",
                    re.I)
_CORES_IN_NAME = re.compile(r"\b(\d+)-cores?\b", re.I)


@dataclass(frozen=True)
class TdpRow:
    """One table row: the CPU name as the table spells it, TDP in W, cores per package if known."""

    name: str
    tdp_w: float
    cores: int | None = None


@dataclass(frozen=True)
class CorePower:
    """Watts per busy core and where the figure came from (the note goes on the DeviceInfo)."""

    watts_per_core: float
    note: str
    row: TdpRow | None = None
    cores: int | None = None


def normalize_cpu_name(name: str) -> str:
    """Lower-case CPU name without trademark marks, clock, generation, core count or filler words.

    Args:
        name: a name as ``/proc/cpuinfo`` or the table writes it.

    Returns:
        e.g. ``"intel xeon gold 6338"`` for ``"Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"``.
    """
    s = _CLOCK.sub(" ", _MARKS.sub(" ", name))
    return " ".join(_NOISE.sub(" ", s).split()).lower()


@functools.lru_cache(maxsize=4)
def load_table(path: str | Path = TABLE_PATH) -> dict[str, TdpRow]:
    """The TDP table keyed by normalized name (``#`` lines are comments).

    Args:
        path: a CSV with columns ``Name``, ``TDP`` (W) and optional ``Cores``.

    Returns:
        Normalized name -> row; the first row of a name wins.
    """
    with open(path, newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    table: dict[str, TdpRow] = {}
    for rec in csv.DictReader(lines):
        cores = (rec.get("Cores") or "").strip()
        row = TdpRow(name=rec["Name"].strip(), tdp_w=float(rec["TDP"]), cores=int(cores) if cores else None)
        table.setdefault(normalize_cpu_name(row.name), row)
    return table


def lookup_tdp(model_name: str, path: str | Path = TABLE_PATH) -> TdpRow | None:
    """The table row for a CPU name: exact match after normalizing, else the longest row whose
    words all appear in the name and include its model number (a word with 3+ digits).

    Args:
        model_name: the CPU name, e.g. from ``/proc/cpuinfo``.
        path: the table.

    Returns:
        The row, or None when nothing matches.
    """
    table = load_table(str(path))
    key = normalize_cpu_name(model_name)
    if key in table:
        return table[key]
    words = set(key.split())
    best: tuple[int, TdpRow] | None = None
    for norm, row in table.items():
        row_words = norm.split()
        if not any(sum(c.isdigit() for c in w) >= 3 for w in row_words) or not words.issuperset(row_words):
            continue
        if best is None or len(row_words) > best[0]:
            best = (len(row_words), row)
    return best[1] if best else None


def cpu_watts_per_core(cpuinfo: str | Path = "/proc/cpuinfo", *, path: str | Path = TABLE_PATH,
                       default_w: float = DEFAULT_WATTS_PER_CORE) -> CorePower:
    """Watts per busy core of this machine's CPU: TDP / cores per package, or ``default_w``.

    Args:
        cpuinfo: the cpuinfo file (tests pass a fake).
        path: the TDP table.
        default_w: W per core when no row matches or the core count is unknown.

    Returns:
        The figure with a note naming its source, e.g.
        ``"TDP table: Intel Xeon Gold 6338 205 W / 32 cores = 6.41 W/core (cores from /proc/cpuinfo)"``
        or ``"no TDP row for <model>; default 10 W/core"``.
    """
    model = cpu_model_name(cpuinfo)
    try:
        row = lookup_tdp(model, path)
    except (OSError, KeyError, ValueError) as e:  # a broken install: say so, keep the estimate usable
        log.warning("CPU TDP table %s unreadable (%s); using %g W/core", path, e, default_w)
        return CorePower(default_w, f"TDP table unreadable ({type(e).__name__}); default {default_w:g} W/core")
    if row is None:
        return CorePower(default_w, f"no TDP row for {model}; default {default_w:g} W/core")
    facts = _cpuinfo_facts(cpuinfo)
    named = _CORES_IN_NAME.search(model)
    if row.cores:
        cores, source = row.cores, "the table"
    elif named:
        cores, source = int(named.group(1)), "the CPU name"
    elif facts.cores_per_package and not facts.virtual:
        cores, source = facts.cores_per_package, str(cpuinfo)
    else:
        why = (f"this is a virtual machine ({facts.cores_per_package} vCPU cores seen, not the chip's)"
               if facts.virtual else "the cores per package are unknown")
        return CorePower(default_w, f"TDP table: {row.name} {row.tdp_w:g} W, but {why}; "
                                    f"default {default_w:g} W/core", row=row)
    watts = row.tdp_w / cores
    return CorePower(watts, f"TDP table: {row.name} {row.tdp_w:g} W / {cores} cores = {watts:.2f} W/core "
                            f"(cores from {source})", row=row, cores=cores)


@dataclass(frozen=True)
class _Facts:
    cores_per_package: int | None
    virtual: bool


def _cpuinfo_facts(cpuinfo: str | Path) -> _Facts:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return _Facts(None, False)
    cores: set[tuple[str, str]] = set()
    packages: set[str] = set()
    per_package: int | None = None
    virtual = False
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines())}
        if "hypervisor" in fields.get("flags", "").split():
            virtual = True
        if per_package is None and fields.get("cpu cores", "").isdigit():
            per_package = int(fields["cpu cores"])
        if "core id" in fields:
            pkg = fields.get("physical id", "0")
            packages.add(pkg)
            cores.add((pkg, fields["core id"]))
    if per_package is None and cores:
        per_package = max(1, len(cores) // max(1, len(packages)))
    return _Facts(per_package or None, virtual)
