"""CPU energy from Intel/AMD RAPL counters in the Linux powercap tree (tier M1).

Reads the package domains (top-level zones ``intel-rapl:N`` / ``amd-rapl:N`` whose ``name`` is
``package-N``) and, when present, their ``dram`` subzones. Each ``energy_uj`` counter wraps at
``max_energy_range_uj``; a window's delta adds that range back once when the end value is
below the start. Since the PLATYPUS fix (CVE-2020-8694) ``energy_uj`` is readable by root only.

Without root, the Zeus daemon (``zeusd``, from the Zeus project, github.com/ml-energy/zeus)
reads the same counters on the process's behalf over a unix socket: :class:`ZeusdRaplMeter`
speaks its HTTP API (``GET /discover``, ``GET /cpu/get_cumulative_energy``; zeusd before 0.3:
``POST /cpu/<i>/get_index_energy``), as Zeus's own client ``zeus/utils/zeusd.py`` does.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.records import DeviceInfo, WindowResult

log = logging.getLogger(__name__)

_TOP = re.compile(r"^(intel|amd)-rapl:\d+$")
_SUB = re.compile(r"^(intel|amd)-rapl:\d+:\d+$")


@dataclass(frozen=True)
class _Domain:
    name: str  # "package-0", "dram"
    energy_path: Path
    max_range_uj: int | None


class RaplMeter(Meter):
    """CPU package (+ DRAM) energy from RAPL ``energy_uj`` counters, summed over sockets.

    Args:
        root: the powercap folder (tests pass a fake tree).

    Raises:
        MeterError: no package domain under ``root``, or a counter is unreadable (the
            message names the file and the fix).

    Example:
        >>> meter = RaplMeter()                      # doctest: +SKIP
        >>> with meter.window() as w:                # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=32)
        >>> w.result.energy_j                        # doctest: +SKIP
        12.3
    """

    name = "rapl"
    tier = "M1"
    min_window_s = 0.01  # counters update about every 1 ms

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self.notes: tuple[str, ...] = ()
        self.domains = _discover(self.root)
        self._read_all()  # fail now, with the fix, rather than inside a measurement

    @property
    def has_dram(self) -> bool:
        """True when at least one DRAM domain is counted."""
        return any(d.name == "dram" for d in self.domains)

    def device(self) -> DeviceInfo:
        """CPU model and boundary: package + DRAM, or package only when no DRAM domain exists."""
        boundary = "CPU package + DRAM (RAPL)" if self.has_dram else "CPU package (RAPL, no DRAM domain)"
        return DeviceInfo(kind="cpu", name=cpu_model_name(), meter=self.name, boundary=boundary,
                          notes=self.notes + tuple(f"domain {d.name}: {d.energy_path.parent.name}"
                                                   for d in self.domains))

    def _start(self) -> object:
        return self._read_all()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        end = self._read_all()
        total_uj = sum(_delta_uj(s, e, d.max_range_uj)
                       for d, s, e in zip(self.domains, token, end))  # type: ignore[call-overload]
        return WindowResult(energy_j=total_uj / 1e6, duration_s=duration_s, tier="M1")

    def _read_all(self) -> list[int]:
        return [_read_counter(d.energy_path) for d in self.domains]


def _discover(root: Path) -> tuple[_Domain, ...]:
    if not root.is_dir():
        raise MeterError(f"no RAPL powercap tree at {root}; this CPU or kernel exposes no RAPL "
                         "(load the intel_rapl_msr module) or choose --meter estimate")
    domains: list[_Domain] = []
    for zone in sorted(p for p in root.iterdir() if _TOP.match(p.name)):
        name = _read_name(zone)
        if not name.startswith("package"):
            continue  # psys overlaps the package domains
        domains.append(_domain(zone, name))
        for sub in sorted(p for p in zone.iterdir() if _SUB.match(p.name)):
            if _read_name(sub) == "dram":
                domains.append(_domain(sub, "dram"))
    if not domains:
        raise MeterError(f"no RAPL package domain under {root}; choose --meter estimate")
    return tuple(domains)


def _domain(zone: Path, name: str) -> _Domain:
    rng = zone / "max_energy_range_uj"
    try:
        max_range = _read_counter(rng) if rng.exists() else None
    except MeterError:
        max_range = None
    if max_range is None:
        log.warning("%s has no readable max_energy_range_uj; a counter wrap would be missed", zone)
    return _Domain(name=name, energy_path=zone / "energy_uj", max_range_uj=max_range)


def _read_name(zone: Path) -> str:
    try:
        with open(zone / "name") as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_counter(path: Path) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except PermissionError:
        root = next(p for p in path.parents if not (_TOP.match(p.name) or _SUB.match(p.name)))
        raise MeterError(f"cannot read {path} (root-only since the PLATYPUS fix); run "
                         f"`sudo chmod a+r {root}/*rapl*/energy_uj` or run greenopt as root") from None
    except (OSError, ValueError) as e:
        raise MeterError(f"cannot read RAPL counter {path}: {e}") from None


def _delta_uj(start: int, end: int, max_range_uj: int | None) -> int:
    if end >= start:
        return end - start
    if max_range_uj is None:
        raise MeterError("RAPL counter wrapped and its max_energy_range_uj is unknown; "
                         "measure again with a shorter window")
    return end + max_range_uj - start


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU model from ``/proc/cpuinfo`` (``model name``), or the platform's processor name.

    Args:
        cpuinfo: path of the cpuinfo file.

    Returns:
        The model name, e.g. ``"AMD EPYC 7763 64-Core Processor"``.
    """
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


# ---------------------------------------------------------------------------- RAPL through zeusd

ZEUSD_SOCKET_PATHS = ("/run/zeusd/zeusd.sock", "/var/run/zeusd.sock")
"""Where zeusd listens by default: ``/run/zeusd/zeusd.sock`` (zeusd 0.3+, ``zeusd serve``);
``/var/run/zeusd.sock`` in the docs of earlier versions. ``ZEUSD_SOCK_PATH`` overrides both."""


def zeusd_socket_path() -> Path | None:
    """The zeusd socket to use: ``$ZEUSD_SOCK_PATH`` when set, else the first default that exists.

    Returns:
        The socket path, or None when the variable is unset and no default socket exists.
    """
    env = os.environ.get("ZEUSD_SOCK_PATH")
    if env:
        return Path(env)
    return next((Path(p) for p in ZEUSD_SOCKET_PATHS if Path(p).exists()), None)


class ZeusdRaplMeter(Meter):
    """CPU package (+ DRAM) RAPL energy read through the zeusd daemon, summed over sockets.

    zeusd runs as root and serves RAPL counters over a unix socket (HTTP/1.1), so greenopt
    needs no root. zeusd counts the counters' wraparounds itself and returns cumulative µJ;
    a value that goes backwards (a daemon restart) flags the window ``counter-not-monotonic``.

    Args:
        socket_path: the zeusd socket; None uses :func:`zeusd_socket_path`.
        token: a zeusd bearer token (needed when the daemon requires auth); None reads
            ``$ZEUSD_TOKEN``.
        timeout_s: per-request timeout, in s.

    Raises:
        MeterError: no socket, the daemon does not answer, refuses (auth, no ``cpu-read``
            API), or sees no RAPL package.

    Example:
        >>> meter = ZeusdRaplMeter("/run/zeusd/zeusd.sock")  # doctest: +SKIP
        >>> with meter.window() as w:                        # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=32)
    """

    name = "rapl-zeusd"
    tier = "M1"
    min_window_s = 0.01

    def __init__(self, socket_path: str | Path | None = None, *, token: str | None = None,
                 timeout_s: float = 2.0) -> None:
        path = Path(socket_path) if socket_path is not None else zeusd_socket_path()
        if path is None:
            raise MeterError(f"no zeusd socket (ZEUSD_SOCK_PATH unset, none at {' or '.join(ZEUSD_SOCKET_PATHS)}); "
                             "start zeusd to read RAPL without root")
        if not path.exists():
            raise MeterError(f"no zeusd socket at {path}; start zeusd (zeusd serve --socket-path {path}) "
                             "or unset ZEUSD_SOCK_PATH")
        self.socket_path = path
        self.notes: tuple[str, ...] = ()
        self._client = _ZeusdClient(path, token if token is not None else os.environ.get("ZEUSD_TOKEN"), timeout_s)
        self.legacy, self.cpus = self._discover()  # cpus: ((package id, dram available), ...)
        self._read_all()  # fail now rather than inside a measurement

    @property
    def has_dram(self) -> bool:
        """True when at least one DRAM domain is counted."""
        return any(dram for _, dram in self.cpus)

    def device(self) -> DeviceInfo:
        """CPU model and boundary: package + DRAM, or package only, read through zeusd."""
        boundary = "CPU package + DRAM (RAPL via zeusd)" if self.has_dram else \
            "CPU package (RAPL via zeusd, no DRAM domain)"
        api = "zeusd < 0.3 API" if self.legacy else "zeusd API"
        return DeviceInfo(kind="cpu", name=cpu_model_name(), meter=self.name, boundary=boundary,
                          notes=self.notes + (f"{api} at {self.socket_path}; packages "
                                              f"{', '.join(str(i) for i, _ in self.cpus)}",))

    def _discover(self) -> tuple[bool, tuple[tuple[int, bool], ...]]:
        status, data = self._client.request("GET", "/discover")
        if status == 404:  # zeusd before 0.3 has no /discover: probe packages one by one
            cpus = []
            while len(cpus) < 256:
                status, data = self._client.request("GET", f"/cpu/{len(cpus)}/supports_dram_energy")
                if status != 200 or not isinstance(data, dict):
                    break
                cpus.append((len(cpus), bool(data.get("dram_available"))))
            if not cpus:
                raise MeterError(f"zeusd at {self.socket_path} serves no RAPL CPU package")
            return True, tuple(cpus)
        self._client.check(status, data, "/discover")
        if not isinstance(data, dict):
            raise MeterError(f"zeusd at {self.socket_path} sent an unreadable /discover answer")
        groups = data.get("enabled_api_groups")
        if groups is not None and "cpu-read" not in groups:
            raise MeterError(f"zeusd at {self.socket_path} has its cpu-read API disabled (enabled: "
                             f"{', '.join(groups) or 'none'}); enable cpu-read in zeusd")
        if data.get("auth_required") and not self._client.token:
            raise MeterError(f"zeusd at {self.socket_path} requires a token; "
                             "set ZEUSD_TOKEN to one with cpu-read scope")
        try:
            cpus = tuple((int(c["id"]), bool(c.get("dram_available"))) for c in data.get("cpus") or ())
        except (KeyError, TypeError, ValueError):
            raise MeterError(f"zeusd at {self.socket_path} sent an unreadable CPU list in /discover") from None
        if not cpus:
            raise MeterError(f"zeusd at {self.socket_path} sees no RAPL CPU package")
        return False, tuple(sorted(cpus))

    def _read_all(self) -> list[int]:
        if self.legacy:
            answers = {}
            for i, dram in self.cpus:
                status, data = self._client.request("POST", f"/cpu/{i}/get_index_energy", {"cpu": True, "dram": dram})
                answers[str(i)] = self._client.check(status, data, "get_index_energy")
        else:
            dram = "true" if self.has_dram else "false"
            status, data = self._client.request("GET", f"/cpu/get_cumulative_energy?cpu=true&dram={dram}")
            answers = self._client.check(status, data, "get_cumulative_energy")
        values = []
        for i, dram_available in self.cpus:
            entry = answers.get(str(i)) if isinstance(answers, dict) else None
            keys = ("cpu_energy_uj", "dram_energy_uj") if dram_available else ("cpu_energy_uj",)
            for key in keys:
                value = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(value, int):
                    raise MeterError(f"zeusd at {self.socket_path} sent no {key} for CPU package {i}")
                values.append(value)
        return values

    def _start(self) -> object:
        return self._read_all()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        end = self._read_all()
        total_uj, flags = 0, ()
        for s, e in zip(token, end):  # type: ignore[call-overload]
            if e < s:
                log.warning("zeusd RAPL counter went backwards (%d -> %d uJ); daemon restarted?", s, e)
                flags = ("counter-not-monotonic",)
                continue
            total_uj += e - s
        return WindowResult(energy_j=total_uj / 1e6, duration_s=duration_s, tier="M1", flags=flags)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _ZeusdClient:
    """HTTP/1.1 over zeusd's unix socket, one kept-alive connection, reconnecting once on a drop."""

    def __init__(self, path: Path, token: str | None, timeout_s: float) -> None:
        self.path, self.token, self.timeout_s = path, token, timeout_s
        self._conn: _UnixHTTPConnection | None = None

    def request(self, method: str, url: str, body: dict | None = None) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixHTTPConnection(self.path, self.timeout_s)
            try:
                self._conn.request(method, url, body=payload, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException) as e:
                self._conn.close()
                self._conn = None
                if attempt or isinstance(e, (FileNotFoundError, ConnectionRefusedError, TimeoutError)):
                    raise MeterError(f"cannot reach zeusd at {self.path}: {e}") from None
        try:
            data: object = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        return resp.status, data

    def check(self, status: int, data: object, what: str) -> object:
        if status == 200:
            return data
        if status in (401, 403):
            raise MeterError(f"zeusd at {self.path} refused {what} (HTTP {status}): {str(data)[:120]}; "
                             "set ZEUSD_TOKEN to a token with cpu-read scope")
        raise MeterError(f"zeusd at {self.path} answered {what} with HTTP {status}: {str(data)[:120]}")
