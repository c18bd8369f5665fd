"""Inputs shared by every verb that runs a model: where it runs and how it is metered
(:class:`RuntimeSpec`), and which labels its figures go on (:class:`LabelSpec`).

Search, assess, verify, recipes and export provenance all build on these two, so a new
runtime or label option is declared once and reaches every verb.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from greenopt.config._base import Strict

DType = Literal["auto", "float32", "bfloat16", "float16"]
MeterName = Literal["auto", "nvml", "rapl", "estimate"]


class DeviceSpec(Strict):
    """Where a model runs and how its energy is metered.

    ``dtype="auto"`` is bfloat16 on CUDA and float32 on CPU (:func:`greenopt.env.resolve_dtype`);
    ``cpu_watts`` is the per-busy-core power the E1 estimate multiplies CPU time by;
    ``threads`` pins torch's CPU threads (None: torch's own choice).
    """

    dtype: DType = "auto"
    device: str = "auto"
    meter: MeterName = "auto"
    cpu_watts: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)


class RuntimeSpec(DeviceSpec):
    """A model (``default``, a local folder, an export folder or a hub id) and where it runs."""

    model: str = "default"
    trust_remote_code: bool = False


class LabelSpec(Strict):
    """Which label schemes grade the figures (by shipped name or file path), and the grid
    intensity of the carbon line in gCO2e/kWh (475: IEA world average; 0 is a legitimate
    all-renewable grid). ``absolute_scheme=None`` leaves the absolute class off."""

    relative_scheme: str = "relative-eu"
    absolute_scheme: str | None = "absolute-go1"
    intensity_g_per_kwh: float = Field(475.0, ge=0, allow_inf_nan=False)
