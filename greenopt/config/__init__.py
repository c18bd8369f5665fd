"""Validated inputs, one family a file: protocol, evaluation, variants, search, runtime, labels, recipes.

Every input is a frozen pydantic model with ``extra="forbid"``, so a typo in a recipe or a
variant file fails loudly with its field path. Inputs carry a ``version`` and round-trip
through YAML/JSON unchanged. Nothing here imports the rest of greenopt (errors aside).

Example:
    >>> from greenopt.config import Variant, QuantizeStep, Target
    >>> v = Variant(steps=[QuantizeStep(method="hqq", bits=4, group_size=64,
    ...                                  target=Target(include=["*mlp*"]))])
    >>> len(v.hash)
    12
"""

from greenopt.config._base import Strict, dump_yaml, load_json, load_yaml, validated
from greenopt.config.evaluation import CalibSpec, EvalSpec, KLSpec
from greenopt.config.label import LabelClass, LabelScheme, Metric
from greenopt.config.protocol import (
    PROTOCOL_PRESETS,
    TIER_ORDER,
    Protocol,
    ProtocolRef,
    Tier,
    as_protocol,
    downgrade,
    preset_of,
    protocol_preset,
)
from greenopt.config.runtime import DeviceSpec, DType, LabelSpec, MeterName, RuntimeSpec
from greenopt.config.search import (
    FidelitySpec,
    PrunePattern,
    SearchSpec,
    SpaceBits,
    SpaceSpec,
)
from greenopt.config.variant import (
    RUNTIME_EXTRAS,
    RUNTIME_WEIGHTS,
    Deploy,
    DepthStep,
    ExpertPruneStep,
    HealStep,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    QuantMethod,
    QuantOverride,
    RuntimeName,
    Step,
    Target,
    Variant,
    WidthStep,
    load_variant,
    parse_layers,
)

__all__ = [
    "PROTOCOL_PRESETS", "RUNTIME_EXTRAS", "RUNTIME_WEIGHTS", "Deploy", "RuntimeName", "TIER_ORDER", "CalibSpec", "DType", "DepthStep", "DeviceSpec", "EvalSpec",
    "ExpertPruneStep", "FidelitySpec", "HealStep", "KLSpec", "LabelClass", "LabelScheme", "LabelSpec", "MeterName", "Metric",
    "MoefyStep", "Protocol", "ProtocolRef", "PruneStep", "PrunePattern", "QuantMethod", "QuantOverride",
    "QuantizeStep", "RuntimeSpec", "SearchSpec", "SpaceBits", "SpaceSpec", "Step", "Strict", "Target", "Tier",
    "Variant", "WidthStep", "as_protocol", "downgrade", "dump_yaml", "load_json", "load_variant", "load_yaml",
    "parse_layers", "preset_of", "protocol_preset", "validated",
]
