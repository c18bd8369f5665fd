"""Recipe files: one versioned YAML input for ``greenopt search``, ``apply``, ``export`` and ``verify``.

A recipe names the model, then either a ``search`` (space, sampler, budget, target) or one
pinned ``variant``, plus evaluation, energy protocol, label schemes, carbon intensity, the CI
gate and the export folder. Unknown keys are rejected with their field path, and
``load -> dump -> load`` gives an equal recipe.

Example:
    >>> from greenopt.config.recipe import load_recipe
    >>> recipe = load_recipe("recipes/cpu-demo.yaml")          # doctest: +SKIP
    >>> recipe.search_spec().target                               # doctest: +SKIP
    'B'

``greenopt.validate.validate_file`` checks a recipe beyond its schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from greenopt.config import (
    CalibSpec,
    EvalSpec,
    FidelitySpec,
    KLSpec,
    Protocol,
    SearchSpec,
    SpaceSpec,
    Strict,
    Variant,
    load_yaml,
)
from greenopt.config.protocol import (
    _UNION_TAGS,
    ProtocolRef,
    Tier,
    _preset_name,
    as_protocol,
    preset_of,
)
from greenopt.config.runtime import DType, LabelSpec, MeterName
from greenopt.config.search import MAX_TRIALS, KLCut, Rungs, Seed
from greenopt.errors import ConfigError

_LETTER = r"^[A-Z][A-Za-z0-9+]{0,3}$"


class ModelSection(Strict):
    """The model: ``default``, a local transformers folder, or a hub id."""

    id: str = "default"
    dtype: DType = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"id": v} if isinstance(v, str) else v


def _fidelity_default(field: str) -> Any:
    return FidelitySpec.model_fields[field].default


class QuickLookSpec(Strict):
    """The search's fidelity ladder: the quick look that prunes hopeless trials, the accuracy
    rungs and the finalists' scoring (see :class:`~greenopt.config.search.FidelitySpec`)."""

    kl: KLSpec | None = _fidelity_default("kl")
    kl_cut: KLCut = _fidelity_default("kl_cut")
    rungs: Rungs = _fidelity_default("rungs")
    promote_eta: int = Field(_fidelity_default("promote_eta"), ge=2, le=10)
    final_scoring: bool = _fidelity_default("final_scoring")
    final_limit: int | None = Field(_fidelity_default("final_limit"), ge=2)
    perplexity_windows: int = Field(4, ge=0)
    perplexity_tokens: int = Field(128, ge=8)
    perplexity_cut: float | None = Field(3.0, gt=1)
    quick_protocol: Annotated[str, AfterValidator(_preset_name)] | None = "quick"
    energy_cut: float | None = Field(1.5, gt=0)


class Evaluation(EvalSpec):
    """Accuracy tasks (the full fidelity) and, for searches, the quick look before them.
    ``include_path``: a folder of the user's own lm-eval task YAMLs, relative to the recipe's folder."""

    fidelity: QuickLookSpec = QuickLookSpec()

    def eval_spec(self) -> EvalSpec | None:
        """The EvalSpec part (None when no task is listed)."""
        if not self.tasks:
            return None
        return EvalSpec(**self.model_dump(exclude={"fidelity"}))


def _default(field: str) -> Any:
    return SearchSpec.model_fields[field].default


class RecipeSearch(Strict):
    """What a search explores and how: the SearchSpec fields not set elsewhere in the recipe.

    Defaults are SearchSpec's own. ``target_scheme`` picks which of ``labels`` the target
    class is on.
    """

    target: str = Field(_default("target"), pattern=_LETTER)
    target_scheme: Literal["relative", "absolute"] = "relative"
    max_drop: float | None = Field(_default("max_drop"), ge=0, le=1)
    sampler: Literal["tpe", "nsga2", "random"] = _default("sampler")
    constrain_sampler: bool = _default("constrain_sampler")
    population_size: int | None = Field(_default("population_size"), ge=2)
    n_trials: int = Field(_default("n_trials"), ge=1, le=MAX_TRIALS)
    warm_start: bool = _default("warm_start")
    timeout_s: float | None = Field(_default("timeout_s"), gt=0)
    seed: Seed = _default("seed")
    space: SpaceSpec = SpaceSpec()
    runs_dir: str = _default("runs_dir")
    storage: str | None = _default("storage")
    study_name: str | None = _default("study_name")
    heartbeat_interval_s: int = Field(_default("heartbeat_interval_s"), ge=1)
    confirm_top: int = Field(_default("confirm_top"), ge=0, le=20)
    confirm_comparisons: int = Field(_default("confirm_comparisons"), ge=2, le=20)


class Measurement(Strict):
    """Which energy meter to use (``auto``, ``nvml``, ``rapl``, ``estimate``)."""

    meter: MeterName = "auto"
    cpu_watts: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: torch's choice)


class Labels(Strict):
    """Label schemes by shipped name or file path; the absolute class is opt-in (null: off)."""

    relative: str = "relative-eu"
    absolute: str | None = "absolute-go1"


class Carbon(Strict):
    """Grid intensity for the carbon line, gCO2e/kWh (475: IEA world average)."""

    intensity_g_per_kwh: float = Field(475.0, ge=0, allow_inf_nan=False)


class Gate(Strict):
    """Defaults for ``greenopt verify``: worst acceptable class, accuracy budget, weakest tier, and
    whether a tier-E1 estimate may pass at all (``allow_estimate``; the verdict says so)."""

    target: str | None = Field(None, pattern=_LETTER)
    max_drop: float | None = Field(None, ge=0, le=1)
    require_tier: Tier | None = None
    allow_estimate: bool = False


class ExportSection(Strict):
    """Where ``greenopt export``/``apply`` write the checkpoint. Weights are always safetensors."""

    out: str | None = None
    format: Literal["safetensors"] = "safetensors"
    pick: Literal["best"] | int = "best"


class Recipe(Strict):
    """A recipe: model, then exactly one of ``search`` or ``variant``, and how to measure."""

    version: Literal[1] = 1
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelSection = ModelSection()
    search: RecipeSearch | None = None
    variant: Variant | None = None
    evaluation: Evaluation = Evaluation()
    protocol: ProtocolRef = "cpu"
    measurement: Measurement = Measurement()
    labels: Labels = Labels()
    carbon: Carbon = Carbon()
    calibration: CalibSpec = CalibSpec()
    gate: Gate = Gate()
    export: ExportSection = ExportSection()

    def resolved_protocol(self) -> Protocol:
        """The protocol object (a preset name resolved)."""
        return as_protocol(self.protocol)

    def protocol_preset_name(self) -> str | None:
        """The preset the protocol is (by name, or by equal fields), or None for a custom one."""
        return preset_of(self.protocol)

    def label_spec(self) -> LabelSpec:
        """The label schemes and carbon intensity every verb grades this recipe's figures with."""
        return LabelSpec(relative_scheme=self.labels.relative, absolute_scheme=self.labels.absolute,
                         intensity_g_per_kwh=self.carbon.intensity_g_per_kwh)

    def search_spec(self) -> SearchSpec:
        """The SearchSpec this recipe describes.

        Raises:
            ConfigError: the recipe pins a variant, or its protocol is not a preset.
        """
        if self.search is None:
            raise ConfigError("this recipe pins a variant; use greenopt apply, not search")
        preset = self.protocol_preset_name()
        if preset is None:
            raise ConfigError("protocol: a search needs a protocol preset name (go1, cpu, quick, smoke)")
        s, ev = self.search, self.evaluation
        scheme = self.labels.relative if s.target_scheme == "relative" else self.labels.absolute
        return SearchSpec(
            model=self.model.id, dtype=self.model.dtype, target=s.target, scheme=scheme or "",
            max_drop=s.max_drop, sampler=s.sampler, constrain_sampler=s.constrain_sampler,
            population_size=s.population_size, n_trials=s.n_trials, warm_start=s.warm_start,
            timeout_s=s.timeout_s, seed=s.seed, space=s.space,
            fidelity=FidelitySpec(**ev.fidelity.model_dump(), protocol=preset,
                                  eval=ev.eval_spec() or EvalSpec(tasks=())),
            calib=self.calibration, meter=self.measurement.meter, cpu_watts=self.measurement.cpu_watts,
            threads=self.measurement.threads, trust_remote_code=self.model.trust_remote_code,
            device=self.model.device, name=self.name, runs_dir=s.runs_dir, storage=s.storage,
            study_name=s.study_name, heartbeat_interval_s=s.heartbeat_interval_s,
            confirm_top=s.confirm_top, confirm_comparisons=s.confirm_comparisons,
        )


# ---------------------------------------------------------------------------- load / dump


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in _UNION_TAGS]
    return ".".join(parts) or "<root>"


def schema_problems(data: Any) -> tuple[Recipe | None, list[tuple[str, str]]]:
    """Validates raw recipe data; returns (recipe or None, every schema error as (path, message)).

    :func:`greenopt.validate.validate_file` turns these into :class:`~greenopt.records.Issue` records.
    """
    if not isinstance(data, dict):
        return None, [("<root>", "a recipe must be a YAML mapping (model, search or variant, ...)")]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        return None, [(_loc(err["loc"]), err["msg"]) for err in e.errors()]
    if (recipe.search is None) == (recipe.variant is None):
        which = "both" if recipe.search is not None else "neither"
        return recipe, [("search" if which == "both" else "<root>",
                         f"a recipe needs exactly one of 'search' or 'variant'; it has {which}")]
    return recipe, []


def read_recipe_data(path: str | Path) -> Any:
    """Reads a recipe's YAML, inlining ``variant: FILE`` and making ``evaluation.include_path``
    absolute (both relative to the recipe's folder)."""
    p = Path(path)
    data = load_yaml(p)
    if isinstance(data, dict) and isinstance(data.get("variant"), str):
        vpath = Path(data["variant"])
        vpath = vpath if vpath.is_absolute() else p.parent / vpath
        if not vpath.is_file():
            raise ConfigError(f"{p}: variant: no such variant file {vpath}")
        data = {**data, "variant": load_yaml(vpath)}
    ev = data.get("evaluation") if isinstance(data, dict) else None
    if isinstance(ev, dict) and isinstance(ev.get("include_path"), str) and ev["include_path"].strip():
        folder = Path(ev["include_path"]).expanduser()
        data = {**data, "evaluation": {**ev, "include_path": str((p.parent / folder).resolve())}}
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Loads and schema-checks a recipe file.

    Args:
        path: the YAML file.

    Returns:
        The recipe.

    Raises:
        ConfigError: unreadable YAML, or the first schema error with its field path.
    """
    recipe, problems = schema_problems(read_recipe_data(path))
    if problems:
        more = f" (and {len(problems) - 1} more; run greenopt recipe validate)" if len(problems) > 1 else ""
        where, what = problems[0]
        raise ConfigError(f"{path}: {where}: {what}{more}")
    return recipe  # type: ignore[return-value]


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that :func:`load_recipe` reads back to an equal recipe (every field written)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
