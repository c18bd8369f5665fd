"""Test doubles for the search: a deterministic surrogate runner, for tests and benchmarks.

``FakeRunner`` answers ``run(variant)`` without a model: accuracy, energy and perplexity are
fixed functions of the variant's steps (a surrogate, NOT a measurement), shaped after what
real moves do (ENERGY.md §1): fewer layers, narrower FFNs, 2:4 with a sparse kernel and
8/4-bit weights save energy; unstructured sparsity saves none (dense kernels); 2-bit weights
cost accuracy and save little (no fast kernel); early and late layers are the most
sensitive. Every figure is tagged with the fake tier and device, so nothing from it can be
mistaken for a real label.

    >>> from greenopt.testing.search import FakeRunner
    >>> from greenopt.config import Variant, DepthStep
    >>> r = FakeRunner(num_layers=12); r.prepare()
    >>> out = r.run(Variant(steps=[DepthStep(drop=3)]))
    >>> out.comparison.eei < 100
    True

Hooks for failure tests: ``fail`` maps a variant to an exception to raise (or None), and
``calls`` lists the hashes of variants actually run (cache hits never reach the runner).

Accuracy comes per item, on nested item sets: item ``j`` of a task is right when a fixed
low-discrepancy number ``u_j`` is below the variant's accuracy, so any prefix of ``n`` items
scores within about ``1/n`` of it, and two variants are paired the way real ones are (a worse
variant misses the items a better one misses, and some more). ``ladder`` gives the items per
task of each rung (as ``FidelitySpec.ladder``); ``promoted`` lists ``(hash, rung)`` climbs.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

from greenopt.config import SpaceSpec, Variant, parse_layers
from greenopt.evaluate.paired import rung_score
from greenopt.measure import stats
from greenopt.records import (
    Comparison,
    DeviceInfo,
    EnergyMeasurement,
    EvalResult,
    QuickLook,
    RunOutcome,
    TaskScore,
    Tier,
    TrialFigures,
)
from greenopt.search.runner import Cuts, Progress, Promote

BASE_ACCURACY = {"arc_easy": 0.60, "piqa": 0.66}
CHANCE = {"arc_easy": 0.25, "piqa": 0.5}
BASE_JOULES_PER_TOKEN = 0.5
BASE_PERPLEXITY = 12.0
FULL_ITEMS = {"arc_easy": 570, "piqa": 1838}  # the full set of a task (others: 500)
_GOLDEN = (math.sqrt(5) - 1) / 2
_Q_ENERGY = {16: 1.0, 8: 0.62, 4: 0.45, 3: 0.55, 2: 0.6}  # 3/2-bit: no fast kernel
_Q_LOSS = {16: 0.0, 8: 0.0002, 4: 0.002, 3: 0.008, 2: 0.03}
_ATTN, _FFN, _HEAD, _MISC = 0.3, 0.7, 0.1, 0.1  # shares: within a layer; of the whole


class _Part:
    __slots__ = ("cost", "bits", "loss_scale")

    def __init__(self, cost: float, loss_scale: float) -> None:
        self.cost, self.bits, self.loss_scale = cost, 16, loss_scale


def surrogate(variant: Variant, num_layers: int) -> tuple[float, float, float]:
    """(EEI, accuracy loss as a fraction, bytes ratio) of a variant under the fake model.

    Deterministic; the baseline gives (100.0, 0.0, 1.0).
    """
    sens = [3.0 if i in (0, num_layers - 1) else 1.0 for i in range(num_layers)]
    layers: list[dict[str, _Part]] = [{"attn": _Part(_ATTN, s), "ffn": _Part(_FFN, s)} for s in sens]
    head_bits, loss = 16, 0.0
    for step in variant.steps:
        if step.kind == "depth":
            for _ in range(step.drop):
                if len(layers) <= 2:
                    break
                k = min(range(1, len(layers) - 1), key=lambda i: (layers[i]["ffn"].loss_scale, -i))
                loss += 0.012 * layers[k]["ffn"].loss_scale
                del layers[k]
        elif step.kind == "width":
            for lay in layers:
                lay["ffn"].cost *= step.ffn_keep
                lay["attn"].cost *= step.heads_keep
            loss += 0.25 * (1 - step.ffn_keep) ** 2 + 0.4 * (1 - step.heads_keep) ** 2
        elif step.kind == "moefy":
            for lay in layers:
                lay["ffn"].cost *= step.top_k / step.experts + 0.05
            loss += 0.08 * (1 - step.top_k / step.experts)
        elif step.kind == "expert_prune":
            loss += 0.1 * (1 - step.keep) ** 2
        elif step.kind == "prune":
            if step.pattern == "2:4":
                for lay in layers:
                    for p in lay.values():
                        p.cost *= 0.8
                loss += 0.05
            else:
                loss += 0.15 * step.sparsity ** 2
        elif step.kind == "quantize":
            if "lm_head" in step.target.include:
                head_bits = step.bits
                continue
            for i, lay in enumerate(layers):
                for name, part in lay.items():
                    part.bits = _bits_for(step, i, name)
    layer_cost = sum(p.cost * _Q_ENERGY[p.bits] for lay in layers for p in lay.values()) / num_layers
    loss += sum(_Q_LOSS[p.bits] * p.loss_scale for lay in layers for p in lay.values())
    loss += {16: 0.0, 8: 0.004, 4: 0.03}.get(head_bits, 0.08)
    total = _MISC + _HEAD * _Q_ENERGY.get(head_bits, 1.0) + (1 - _MISC - _HEAD) * layer_cost
    bytes_ratio = sum(p.cost * p.bits / 16 for lay in layers for p in lay.values()) / num_layers
    return 100.0 * total, loss, bytes_ratio


def _bits_for(step: Any, layer: int, part: str) -> int:
    glob = "*self_attn*" if part == "attn" else "*mlp*"
    for o in step.overrides:
        inc = o.target.include
        if ("*" in inc or glob in inc) and (o.target.layers is None or layer in parse_layers(o.target.layers)):
            return o.bits if o.bits is not None else step.bits
    return step.bits


def fake_measurement(joules_per_token: float, ci: tuple[float, float], *, tier: Tier = "M1",
                     device: str = "fake device", protocol_id: str = "GO-1/b1/p64-n32",
                     tokens_per_s: float = 100.0) -> EnergyMeasurement:
    """A well-formed EnergyMeasurement with the given median J/token and interval."""
    tokens = 64
    trials = tuple(TrialFigures(energy_j=joules_per_token * tokens * f, duration_s=tokens / tokens_per_s,
                                generated_tokens=tokens, prompt_tokens=64) for f in (0.99, 1.0, 1.0, 1.0, 1.01))
    dev = DeviceInfo(kind="cpu", name=device, meter="fake", boundary="fake meter (tests only)")
    return EnergyMeasurement(joules_per_token=joules_per_token, joules_per_token_ci=ci, trials=trials,
                             tokens_per_s=tokens_per_s, mean_power_w=joules_per_token * tokens_per_s, cv=0.01,
                             tier=tier, source_tier=tier, device=dev, protocol_id=protocol_id)


def fake_comparison(eei: float, half_width: float, *, tier: Tier = "M1", device: str = "fake device",
                    protocol_id: str = "GO-1/b1/p64-n32") -> Comparison:
    """A Comparison with the given EEI and a symmetric interval of ``half_width`` EEI points."""
    base = fake_measurement(BASE_JOULES_PER_TOKEN, (0.98 * BASE_JOULES_PER_TOKEN, 1.02 * BASE_JOULES_PER_TOKEN),
                            tier=tier, device=device, protocol_id=protocol_id)
    jpt = BASE_JOULES_PER_TOKEN * eei / 100
    rel = half_width / eei if eei else 0.0
    cand = fake_measurement(jpt, (jpt * (1 - rel), jpt * (1 + rel)), tier=tier, device=device,
                            protocol_id=protocol_id, tokens_per_s=100.0 * 100.0 / max(eei, 1e-6))
    return Comparison(eei=eei, eei_ci=(max(0.0, eei - half_width), eei + half_width), baseline=base, candidate=cand)


class FakeRunner:
    """A TrialRunner whose figures come from :func:`surrogate` (no model, no meter).

    Args:
        num_layers: layers of the pretend model.
        tasks: task names (known: arc_easy, piqa; others start at 0.5 accuracy).
        tier: tier stamped on every figure (``E1`` to exercise estimated grades).
        device_name: the pretend device (results are reused only on the same device).
        fail: ``fail(variant) -> exception or None``; a returned exception is raised by ``run``.
        half_width: EEI interval half-width in points; default: 2-5 points drawn from the hash.
        sleep_s: seconds to sleep per run (for timeout and multi-worker tests).
    """

    def __init__(self, num_layers: int = 12, *, tasks: tuple[str, ...] = ("arc_easy", "piqa"), tier: Tier = "M1",
                 device_name: str = "fake device", fail: Callable[[Variant], BaseException | None] | None = None,
                 half_width: float | None = None, sleep_s: float = 0.0,
                 protocol_id: str = "GO-1/b1/p64-n32",
                 confirm_eei: Callable[[Variant, float], float] | None = None,
                 ladder: tuple[int | None, ...] = (100,)) -> None:
        self._layers, self.tasks, self.tier, self._device = num_layers, tasks, tier, device_name
        self.fail, self.half_width, self.sleep_s, self.protocol_id = fail, half_width, sleep_s, protocol_id
        self.confirm_eei, self.ladder = confirm_eei, ladder
        self.calls: list[str] = []
        self.confirmed: list[str] = []
        self.scored: list[tuple[str, int | None]] = []
        self.promoted: list[tuple[str, int]] = []
        self.prepared = False

    def prepare(self, progress: Progress | None = None) -> None:
        self.prepared = True

    @property
    def num_layers(self) -> int:
        return self._layers

    @property
    def device_name(self) -> str:
        return self._device

    @property
    def baseline_eval(self) -> EvalResult:
        return self._eval(0.0, self.ladder[0])

    def baseline_score(self, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        return self._eval(0.0, limit)

    def score(self, variant: Variant, limit: int | None, *, progress: Progress | None = None) -> EvalResult:
        """The variant's surrogate accuracy on ``limit`` items per task (the finalists' scoring)."""
        self.scored.append((variant.hash, limit))
        return self._eval(surrogate(variant, self._layers)[1], limit)

    def environment(self) -> dict[str, Any]:
        return {"model": "fake", "device": {"name": self._device, "kind": "cpu"}, "meter": "fake",
                "meter_tier": self.tier}

    def close(self) -> None:
        pass

    def run(self, variant: Variant, *, cut: Cuts | None = None, promote: Promote | None = None,
            progress: Progress | None = None) -> RunOutcome:
        if not self.prepared:
            raise RuntimeError("call prepare() first")
        self.calls.append(variant.hash)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        exc = self.fail(variant) if self.fail else None
        if exc is not None:
            raise exc
        eei, loss, _ = surrogate(variant, self._layers)
        hw = self.half_width if self.half_width is not None else eei * (0.02 + 0.03 * _unit(variant.hash))
        if progress:
            progress("fake", 1, 1)
        if cut is not None and not variant.is_baseline:
            quick = QuickLook(perplexity=BASE_PERPLEXITY * math.exp(8 * loss), baseline_perplexity=BASE_PERPLEXITY)
            reason = cut(quick)
            if not reason and cut.needs_energy:
                quick = quick.model_copy(update={"comparison": fake_comparison(
                    eei, 2 * hw, tier=self.tier, device=self._device, protocol_id="GO-1/b1/p32-n16")})
                reason = cut(quick)
            if reason:
                return RunOutcome(quick=quick, pruned=reason)
        else:
            quick = None
        cmp = fake_comparison(eei, hw, tier=self.tier, device=self._device, protocol_id=self.protocol_id)
        ev = self._eval(loss, self.ladder[0])
        rungs = [rung_score(ev, self._eval(0.0, self.ladder[0]))]
        while promote is not None and not variant.is_baseline and len(rungs) < len(self.ladder) \
                and promote(len(rungs) - 1, rungs[-1], cmp):
            self.promoted.append((variant.hash, len(rungs)))
            limit = self.ladder[len(rungs)]
            ev = self._eval(loss, limit)
            rungs.append(rung_score(ev, self._eval(0.0, limit)))
        return RunOutcome(quick=quick, eval=ev, rungs=tuple(rungs), comparison=cmp,
                          durations_s={"fake_s": self.sleep_s})

    def fit_space(self, space: SpaceSpec, kernels_path: Path) -> SpaceSpec:
        """The space as given: the fake runs every choice equally well."""
        return space

    def confirm(self, variant: Variant, repeats: int, *, progress: Progress | None = None) -> Comparison:
        """Repeated comparisons around ``confirm_eei(variant, search_eei)`` (default: the search's
        own EEI), spread +-3% between the repeats."""
        self.confirmed.append(variant.hash)
        eei, _, _ = surrogate(variant, self._layers)
        eei = self.confirm_eei(variant, eei) if self.confirm_eei else eei
        runs = [eei * (1 + 0.03 * (k - (repeats - 1) / 2) / max(1, (repeats - 1) / 2)) for k in range(repeats)]
        hw = eei * 0.02
        point, ci = stats.combine_eei(runs, [(x - hw, x + hw) for x in runs])
        cmp = fake_comparison(point, 0.0, tier=self.tier, device=self._device, protocol_id=self.protocol_id)
        return cmp.model_copy(update={"eei_ci": ci, "interval": "repeated", "runs": tuple(runs)})

    def _eval(self, loss: float, limit: int | None) -> EvalResult:
        scores = []
        for i, t in enumerate(self.tasks):
            base, chance = BASE_ACCURACY.get(t, 0.5), CHANCE.get(t, 0.25)
            p = max(chance, base - loss * (1.0 + 0.2 * i))
            full = FULL_ITEMS.get(t, 500)
            n = full if limit is None else min(limit, full)
            offset = _unit(t)
            items = tuple(float((j * _GOLDEN + offset) % 1.0 < p) for j in range(n))
            scores.append(TaskScore(task=t, metric="acc_norm", value=sum(items) / n, n=n, items=items))
        return EvalResult(scores=tuple(scores), limit=limit, seed=1234)


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
