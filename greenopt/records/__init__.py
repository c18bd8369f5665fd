"""Frozen outputs, every one in this package: measurements, evaluation results, move reports,
grades and label cards, trial records and search results, gate verdicts and export manifests.

Units are in field names (``energy_j``, ``duration_s``, ``power_w``). Every energy figure
carries its tier (``M1`` counter, ``M2`` sampled power, ``E1`` estimate), the device and
measurement boundary, and the protocol id, so nothing greenopt prints is unattributed.
Records are pydantic models: frozen, and JSON round-trips through ``model_dump`` /
``model_validate``. They import only :mod:`greenopt.config`.
"""

from greenopt.config.protocol import TIER_ORDER, Tier, downgrade
from greenopt.records._base import Record
from greenopt.records.label import (
    CarbonLine,
    EnergySummary,
    Grade,
    KernelProbe,
    KernelTiming,
    LabelCard,
    RuntimeDescription,
    RuntimeInfo,
    TaskLine,
    VariantInfo,
)
from greenopt.records.measure import (
    ApplyReport,
    Comparison,
    DeviceInfo,
    EnergyMeasurement,
    EvalResult,
    KLLook,
    NoiseFloor,
    PairedDifference,
    StepReport,
    TaskScore,
    TrialFigures,
    WindowResult,
)
from greenopt.records.search import (
    ClosestRow,
    FinalistTest,
    FrontRow,
    Goal,
    QuickLook,
    RungScore,
    RunOutcome,
    SearchResult,
    State,
    TrialRecord,
    Unreachable,
)
from greenopt.records.ship import (
    ExportManifest,
    GateResult,
    Issue,
    ModelInfo,
    ValidationReport,
)

__all__ = [
    "TIER_ORDER", "ApplyReport", "CarbonLine", "ClosestRow", "Comparison", "DeviceInfo", "EnergyMeasurement",
    "EnergySummary", "EvalResult", "ExportManifest", "FinalistTest", "FrontRow", "GateResult", "Goal", "Grade", "Issue", "KernelProbe", "KernelTiming", "KLLook", "LabelCard",
    "ModelInfo", "NoiseFloor", "PairedDifference", "QuickLook", "Record", "RungScore", "RunOutcome", "RuntimeDescription", "RuntimeInfo", "SearchResult", "State", "StepReport",
    "TaskLine", "TaskScore", "Tier", "TrialFigures", "TrialRecord", "Unreachable", "ValidationReport",
    "VariantInfo", "WindowResult", "downgrade",
]
