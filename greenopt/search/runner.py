"""Trial runners: what a search trial does to one variant, behind a small interface.

The search loop only sees :class:`TrialRunner`: ``prepare()`` once (load the model, score
the baseline), then ``run(variant, cut=...)`` per trial, returning a :class:`RunOutcome`.
:class:`TransformersRunner` is the real one; ``greenopt.testing.search.FakeRunner`` is a
deterministic surrogate for tests and benchmarks.

A run climbs a fidelity ladder. The quick look (KL from the baseline and perplexity on
held-aside text, then a short energy comparison under the ``quick`` protocol) is offered to
``cut``; a cut returns a reason and the trial ends there as pruned. Otherwise the variant is
scored on the first accuracy rung (lm-eval tasks, paired against the baseline on the same
items) and compared against the baseline under the full protocol, on the same device and
meter, which is the only figure that is ever graded; ``promote`` then decides whether it is
scored on the next, larger item set (successive halving, :mod:`greenopt.search.rungs`).

Example:
    >>> from greenopt.config import SearchSpec, Variant
    >>> runner = TransformersRunner(SearchSpec(model="default"))   # doctest: +SKIP
    >>> runner.prepare()                                            # doctest: +SKIP
    >>> outcome = runner.run(Variant())                             # doctest: +SKIP
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from greenopt import offline
from greenopt.compress import ApplyContext
from greenopt.compress.calibration import text_windows
from greenopt.config import SearchSpec, SpaceSpec, Variant, protocol_preset
from greenopt.env import resolve_device, resolve_dtype
from greenopt.evaluate import evaluate, validate_tasks
from greenopt.evaluate.cache import baseline_eval, model_key
from greenopt.evaluate.fidelity import baseline_reference, kl_cut_for_drop, kl_look
from greenopt.evaluate.lean_lm import token_logprobs
from greenopt.evaluate.paired import rung_score
from greenopt.label import Goal
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare, compare_repeated
from greenopt.models import load_model, model_config
from greenopt.records import Comparison, EvalResult, QuickLook, RungScore, RunOutcome
from greenopt.runtimes import as_runtime, deploy
from greenopt.search.machine import space_for_machine
from greenopt.search.space import space_for_model

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
#: ``promote(rung, score, comparison)``: whether a trial scored on rung ``rung`` climbs to the next.
Promote = Callable[[int, RungScore, Comparison], bool]


@dataclass(frozen=True)
class Cuts:
    """When a quick look ends a trial as pruned; ``cuts(quick)`` returns the reason or None.

    Args:
        perplexity_ratio: prune when perplexity exceeds this multiple of the baseline's.
        kl_nats: prune when the KL look exceeds this many nats/token (``kl_source`` says why this cut).
        quick_eei: prune when the best (lower) end of the quick EEI interval exceeds this.
    """

    perplexity_ratio: float | None = None
    quick_eei: float | None = None
    kl_nats: float | None = None
    kl_source: str = ""

    @property
    def needs_energy(self) -> bool:
        return self.quick_eei is not None

    def __call__(self, quick: QuickLook) -> str | None:
        kl = quick.kl_nats_per_token
        if self.kl_nats is not None and kl is not None and kl > self.kl_nats:
            return f"KL: {kl:.3g} nats/token from the baseline > cut {self.kl_nats:.3g}{self.kl_source}"
        r = quick.perplexity_ratio
        if self.perplexity_ratio is not None and r is not None and r > self.perplexity_ratio:
            return (f"perplexity: {quick.perplexity:.4g} is {r:.2f}x the baseline's "
                    f"(cut at {self.perplexity_ratio:g}x)")
        c = quick.comparison
        if self.quick_eei is not None and c is not None and c.eei_ci[0] > self.quick_eei:
            return f"energy: quick EEI {c.eei:.1f} [{c.eei_ci[0]:.1f}, {c.eei_ci[1]:.1f}] > cut {self.quick_eei:.1f}"
        return None


def cuts_for(spec: SearchSpec, target: Goal) -> Cuts | None:
    """The quick-look cuts of a search: KL, perplexity ratio and quick EEI, as the fidelity spec sets them."""
    fid = spec.fidelity
    ppl = fid.perplexity_cut if fid.perplexity_windows else None
    bound = target.bound
    eei = (fid.energy_cut * bound if fid.energy_cut and fid.quick_protocol and target.scheme.relative
           and math.isfinite(bound) else None)
    kl, source = None, ""
    if fid.kl is not None and isinstance(fid.kl_cut, float):
        kl, source = fid.kl_cut, " (fidelity.kl_cut)"
    elif fid.kl is not None and fid.kl_cut == "auto" and spec.max_drop is not None:
        kl = kl_cut_for_drop(spec.max_drop)
        source = f" (derived from max_drop {spec.max_drop:g}: twice the drop on the measured mapping)"
    return Cuts(perplexity_ratio=ppl, quick_eei=eei, kl_nats=kl, kl_source=source) if (ppl or eei or kl) else None


@runtime_checkable
class TrialRunner(Protocol):
    """Runs variants for the search. ``prepare`` must precede ``num_layers`` and ``run``."""

    def prepare(self, progress: Progress | None = None) -> None:
        """Loads the model and scores the baseline (idempotent)."""

    @property
    def num_layers(self) -> int:
        """Decoder layers of the searched model."""

    @property
    def device_name(self) -> str:
        """The measured device, as the meter names it (results are only reused on the same one)."""

    @property
    def baseline_eval(self) -> EvalResult:
        """The baseline's accuracy on the first rung, scored once per process."""

    def run(self, variant: Variant, *, cut: Cuts | None = None, promote: Promote | None = None,
            progress: Progress | None = None) -> RunOutcome:
        """Applies ``variant`` to a fresh copy of the baseline, looks, maybe cuts, evaluates, compares,
        and climbs the accuracy rungs while ``promote`` says so."""

    def baseline_score(self, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        """The baseline on ``limit`` items per task (None: full sets), per item; cached per limit."""

    def score(self, variant: Variant, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        """``variant`` deployed afresh and scored on ``limit`` items per task, per item (the finalists)."""

    def environment(self) -> dict[str, Any]:
        """Facts about the model, device and meter for ``environment.json``."""

    def fit_space(self, space: SpaceSpec, kernels_path: Path) -> SpaceSpec:
        """The space narrowed to what runs well where this runner runs (before ``prepare``)."""

    def confirm(self, variant: Variant, repeats: int, *, progress: Progress | None = None) -> Comparison:
        """``repeats`` fresh comparisons of ``variant`` against the baseline, combined
        (:func:`greenopt.measure.workload.compare_repeated`) under the full protocol."""

    def close(self) -> None:
        """Frees the model."""


class TransformersRunner:
    """The real runner: a transformers model kept on its device, deep-copied per trial.

    Args:
        spec: the search spec (model, dtype, device, meter, fidelity, calibration).
        model, tokenizer: an already loaded model and tokenizer (tests); default: load ``spec.model``.
        meter: an energy meter; default ``select_meter(spec.meter, ...)`` for the device.
        device: overrides ``spec.device`` (a worker on another GPU).
    """

    def __init__(self, spec: SearchSpec, *, model: Any = None, tokenizer: Any = None, meter: Any = None,
                 device: str | None = None) -> None:
        self.spec = spec
        self._model, self._tok, self._meter = model, tokenizer, meter
        self._device_arg = device or spec.device
        self._info: Any = None
        self._ctx: Any = None
        self._baseline_evals: dict[int | None, EvalResult] = {}
        self._baseline_ppl: float | None = None
        self._windows: Any = None
        self._left_out: dict[str, str] = {}
        self._kl_ref: Any = None

    # ------------------------------------------------------------------ setup

    def prepare(self, progress: Progress | None = None) -> None:
        if self._baseline_evals:
            return

        validate_tasks(self.spec.fidelity.eval.tasks, self.spec.fidelity.eval.include_path)
        device = resolve_device(self._device_arg)
        if self._meter is None:
            self._meter = select_meter(self.spec.meter, cpu_watts=self.spec.cpu_watts, device=device)
        if self._model is None:

            dtype = resolve_dtype(self.spec.dtype, device)
            self._model, self._tok, self._info = load_model(self.spec.model, dtype=dtype, device=device)
        self._model.eval()
        self._ctx = ApplyContext(tokenizer=self._tok, calib=self.spec.calib)
        if self.spec.fidelity.kl is not None:
            self._kl_ref = baseline_reference(self._model, self._tok, self.spec.fidelity.kl)
        if self.spec.fidelity.perplexity_windows:
            self._baseline_ppl = self._perplexity(self._model)
        log.info("scoring the baseline on %s", ", ".join(self.spec.fidelity.eval.tasks))
        self.baseline_score(self.spec.fidelity.ladder[0], progress=progress)

    @property
    def num_layers(self) -> int:
        return int(self._need_model().config.num_hidden_layers)

    @property
    def device_name(self) -> str:
        return self._meter.device().name

    @property
    def baseline_eval(self) -> EvalResult:
        first = self.spec.fidelity.ladder[0]
        if first not in self._baseline_evals:
            raise RuntimeError("call prepare() first")
        return self._baseline_evals[first]

    def baseline_score(self, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        if limit not in self._baseline_evals:  # on disk too, per model files, items and scorer
            info = self._info
            key = model_key(info, info.dtype, info.device) if info is not None else None
            self._baseline_evals[limit] = baseline_eval(self._need_model(), self._tok, self._eval_spec(limit), key=key,
                                                        progress=_prefixed(progress, "baseline eval"), keep_items=True)
        return self._baseline_evals[limit]

    def score(self, variant: Variant, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        cand = copy.deepcopy(self._need_model())
        try:
            cand, _ = deploy(cand, self._tok, variant, ctx=self._ctx)
            return evaluate(cand, self._tok, self._eval_spec(limit), progress=_prefixed(progress, "final eval"),
                            keep_items=True)
        finally:
            del cand
            _free()

    def _eval_spec(self, limit: int | None) -> Any:
        return self.spec.fidelity.eval.model_copy(update={"limit": limit})

    def fit_space(self, space: SpaceSpec, kernels_path: Path) -> SpaceSpec:
        narrowed, self._left_out = space_for_machine(space, resolve_device(self._device_arg), kernels_path)
        config = self._model.config if self._model is not None else model_config(
            self.spec.model, trust_remote_code=self.spec.trust_remote_code)
        if config is not None:
            narrowed, for_model = space_for_model(narrowed, config)
            self._left_out.update(for_model)
        return narrowed

    def environment(self) -> dict[str, Any]:
        dev = self._meter.device()
        model = self._need_model()
        return {"model": self.spec.model, "model_info": self._info.model_dump() if self._info else None,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "device": dev.model_dump(), "meter": self._meter.name, "meter_tier": self._meter.tier,
                "space_left_out": self._left_out}

    def close(self) -> None:
        self._model = None
        _free()

    def _need_model(self) -> Any:
        if self._model is None:
            raise RuntimeError("call prepare() first")
        return self._model

    # ------------------------------------------------------------------ one trial

    def run(self, variant: Variant, *, cut: Cuts | None = None, promote: Promote | None = None,
            progress: Progress | None = None) -> RunOutcome:
        base = self._need_model()
        fid = self.spec.fidelity
        times: dict[str, float] = {}
        cand = copy.deepcopy(base)
        try:
            t = time.perf_counter()
            cand, report = deploy(cand, self._tok, variant, ctx=self._ctx, progress=_prefixed(progress, "apply"))
            times["apply_s"] = time.perf_counter() - t
            quick = None
            if not variant.is_baseline and cut is not None:
                quick, reason = self._quick_look(base, cand, cut, progress, times)
                if reason:
                    return RunOutcome(apply=report, quick=quick, pruned=reason, durations_s=times)
            ev, rungs = self._climb(cand, variant, 0, progress, times)
            t = time.perf_counter()
            cmp = compare(base, cand, self._tok, protocol_preset(fid.protocol), self._meter,
                          progress=_prefixed(progress, "measure"))
            times["measure_s"] = time.perf_counter() - t
            ladder = fid.ladder
            while promote is not None and not variant.is_baseline and len(rungs) < len(ladder) \
                    and promote(len(rungs) - 1, rungs[-1], cmp):
                ev, more = self._climb(cand, variant, len(rungs), progress, times)
                rungs += more
            return RunOutcome(apply=report, quick=quick, eval=ev, rungs=tuple(rungs), comparison=cmp,
                              durations_s=times)
        finally:
            del cand
            _free()

    def _climb(self, cand: Any, variant: Variant, rung: int, progress: Progress | None,
               times: dict[str, float]) -> tuple[EvalResult, list[RungScore]]:
        """Scores the candidate on rung ``rung``, paired against the baseline on the same items."""
        limit = self.spec.fidelity.ladder[rung]
        base_ev = self.baseline_score(limit, progress=progress)
        t = time.perf_counter()
        ev = base_ev if variant.is_baseline else evaluate(
            cand, self._tok, self._eval_spec(limit), progress=_prefixed(progress, "eval"), keep_items=True)
        times["eval_s" if rung == 0 else f"eval_rung{rung}_s"] = time.perf_counter() - t
        return ev, [rung_score(ev, base_ev)]

    def confirm(self, variant: Variant, repeats: int, *, progress: Progress | None = None) -> Comparison:
        base = self._need_model()

        def pair(r: int):  # fresh copies of both sides, the variant re-applied (seeded: same weights)
            return copy.deepcopy(base), deploy(copy.deepcopy(base), self._tok, variant, ctx=self._ctx)[0]

        try:
            return compare_repeated(pair, self._tok, protocol_preset(self.spec.fidelity.protocol), self._meter,
                                    repeats, progress=_prefixed(progress, "confirm"))
        finally:
            _free()

    def _quick_look(self, base: Any, cand: Any, cut: Cuts, progress: Progress | None,
                    times: dict[str, float]) -> tuple[QuickLook, str | None]:

        fid = self.spec.fidelity
        quick = QuickLook(baseline_perplexity=self._baseline_ppl)
        if self._kl_ref is not None:
            t = time.perf_counter()
            quick = quick.model_copy(update={"kl_nats_per_token": kl_look(cand, self._kl_ref).kl_nats_per_token})
            times["kl_s"] = time.perf_counter() - t
            reason = cut(quick)
            if reason:
                return quick, reason
        if fid.perplexity_windows:
            t = time.perf_counter()
            quick = quick.model_copy(update={"perplexity": self._perplexity(cand)})
            times["perplexity_s"] = time.perf_counter() - t
            reason = cut(quick)
            if reason:
                return quick, reason
        if fid.quick_protocol and cut.needs_energy:
            t = time.perf_counter()
            qc = compare(base, cand, self._tok, protocol_preset(fid.quick_protocol), self._meter,
                         progress=_prefixed(progress, "quick measure"))
            times["quick_measure_s"] = time.perf_counter() - t
            quick = quick.model_copy(update={"comparison": qc})
            return quick, cut(quick)
        return quick, None

    def _perplexity(self, model: Any) -> float:
        """exp(mean NLL) over fixed windows of held-aside text, scored on the model's runtime; inf
        when the loss is not finite."""
        if self._windows is None:
            self._windows = _perplexity_windows(self._tok, self.spec.fidelity.perplexity_windows,
                                                self.spec.fidelity.perplexity_tokens)
        # position-chunked log-softmax: memory stays bounded with a large vocabulary
        loss = -float(token_logprobs(as_runtime(model, self._tok), self._windows).double().mean())
        return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def _perplexity_windows(tokenizer: Any, n: int, tokens: int) -> Any:
    """``[n, tokens]`` ids: evenly spread windows over the held-aside ``perplexity`` split.

    Not the calibration text: GPTQ, Wanda, width, depth and the MoE router are fitted on that,
    and scoring them on it would favour calibrated moves. Windows start at a paragraph, after
    BOS where the tokenizer has one (:func:`greenopt.compress.calibration.text_windows`).
    """
    return text_windows(tokenizer, offline.wiki_split("perplexity"), n, tokens)


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix}: {stage}" if stage != prefix else stage, done, total)


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
