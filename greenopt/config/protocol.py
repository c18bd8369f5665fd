"""The energy protocol (shared/ENERGY.md §2), its presets, and the measurement tiers."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag

from greenopt.config._base import Strict, validated
from greenopt.errors import ConfigError

#: Measurement tiers, best first: M1 hardware counter, M2 sampled power, E1 estimate.
Tier = Literal["M1", "M2", "E1"]
TIER_ORDER: tuple[Tier, ...] = ("M1", "M2", "E1")


class Protocol(Strict):
    """Energy protocol GO-1 (shared/ENERGY.md §2). Lengths are in tokens, durations in s."""

    version: Literal[1] = 1
    preset: str = "go1"
    batch_size: int = Field(1, ge=1)
    prompt_tokens: int = Field(256, ge=1, le=131072)
    new_tokens: int = Field(256, ge=1, le=131072)
    warmup_generations: int = Field(3, ge=0)
    warmup_min_s: float = Field(3.0, ge=0)
    trials: int = Field(5, ge=1, le=1000)
    trial_min_s: float = Field(10.0, ge=0)
    trial_min_tokens: int = Field(512, ge=1)
    cv_max: float = Field(0.05, gt=0)
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0

    @property
    def id(self) -> str:
        """Protocol id, e.g. ``GO-1/b1`` or ``GO-1/b1/p64-n32`` for a smaller preset."""
        base = f"GO-{self.version}/b{self.batch_size}"
        if (self.prompt_tokens, self.new_tokens) != (256, 256):
            base += f"/p{self.prompt_tokens}-n{self.new_tokens}"
        return base


PROTOCOL_PRESETS: dict[str, Protocol] = {
    # The spec's protocol: 256 prompt + 256 new tokens, 5 trials of >= 10 s and 512 tokens.
    "go1": Protocol(),
    # CPU-sized: a 135M model on 2 cores finishes a baseline+candidate pair in a few minutes.
    "cpu": Protocol(preset="cpu", prompt_tokens=64, new_tokens=32, warmup_generations=3,
                    warmup_min_s=2.0, trials=5, trial_min_s=3.0, trial_min_tokens=64),
    # Search fidelity 0: a cheap first look used to prune hopeless trials.
    "quick": Protocol(preset="quick", prompt_tokens=32, new_tokens=16, warmup_generations=1,
                      warmup_min_s=0.5, trials=5, trial_min_s=1.0, trial_min_tokens=32),
    # Tests only: tiny models, no minimum duration.
    "smoke": Protocol(preset="smoke", prompt_tokens=8, new_tokens=4, warmup_generations=1,
                      warmup_min_s=0.0, trials=5, trial_min_s=0.0, trial_min_tokens=4),
}


def protocol_preset(name: str, **overrides: Any) -> Protocol:
    """Returns the named protocol preset, with field overrides applied.

    Raises:
        ConfigError: unknown preset name or an invalid override.
    """
    if name not in PROTOCOL_PRESETS:
        raise ConfigError(f"unknown protocol preset {name!r}; choose one of {', '.join(PROTOCOL_PRESETS)}")
    base = PROTOCOL_PRESETS[name]
    return validated(Protocol, {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}},
                     where=f"protocol {name}")


def _preset_name(v: str) -> str:
    if v not in PROTOCOL_PRESETS:
        raise ValueError(f"unknown protocol preset {v!r}; choose one of {', '.join(PROTOCOL_PRESETS)} "
                         "or write the protocol's fields")
    return v


#: A protocol as inputs name it: a preset name (``"cpu"``) or the protocol's fields.
#: :func:`as_protocol` turns either into a :class:`Protocol`.
ProtocolRef = Annotated[
    Union[Annotated[Annotated[str, AfterValidator(_preset_name)], Tag("preset")],
          Annotated[Protocol, Tag("full")]],
    Discriminator(lambda v: "preset" if isinstance(v, str) else "full"),
]

_UNION_TAGS = {"preset", "full"}  # pydantic's tags of ProtocolRef, left out of error paths


def as_protocol(ref: Protocol | str) -> Protocol:
    """The :class:`Protocol` a :data:`ProtocolRef` names (a preset resolved, fields kept).

    Raises:
        ConfigError: an unknown preset name.
    """
    return ref if isinstance(ref, Protocol) else protocol_preset(ref)


def preset_of(ref: Protocol | str) -> str | None:
    """The preset a reference is (by name, or by fields equal to a preset's), or None."""
    if isinstance(ref, str):
        return ref
    return next((k for k, p in PROTOCOL_PRESETS.items() if p == ref), None)


def downgrade(tier: Tier) -> Tier:
    """One tier down (M1 -> M2 -> E1); a figure that failed a validity check gets this."""
    return TIER_ORDER[min(TIER_ORDER.index(tier) + 1, len(TIER_ORDER) - 1)]
