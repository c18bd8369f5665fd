"""Energy protocol GO-1: the fixed generation workload and its statistics (ENERGY.md §2-3).

``measure(model, tokenizer, protocol, meter)`` gives one model's figures;
``compare(baseline, candidate, tokenizer, protocol, meter)`` measures both in one run,
alternating trials (A B A B ..., starting side drawn from ``protocol.seed``) so drift in
temperature, clocks or background load falls on both sides alike.

One measurement, in order:

1. idle: one short window with nothing running (idle W, recorded, never subtracted);
2. warm-up: at least ``warmup_generations`` generations and ``warmup_min_s`` s, discarded;
3. trials: each trial is one meter window around generate calls (``batch_size`` prompts per
   call, cycling through the prompts) until at least ``trial_min_s`` s (and the meter's
   minimum window) and ``trial_min_tokens`` generated tokens; E_tok = window energy /
   generated tokens, prefill included;
4. prefill: one window of prefill-only calls (``max_new_tokens=1``), as many calls as the
   median trial and at least half a trial's duration. A prefill-only call runs the prompt
   forward pass, whose logits give the first new token, so

   - prefill J per prompt token = E(prefill call) / (batch x prompt_tokens),
   - decode J/token = (E(full call) - E(prefill call)) / (batch x (new_tokens - 1)),

   with E(full call) the median over trials of trial energy / calls.

Generation is greedy with the KV cache, exactly ``new_tokens`` new tokens per row
(``min_new_tokens = max_new_tokens``, so EOS cannot end it early), under
``torch.inference_mode``; the model's weights, config and train/eval mode are left as found.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import greenopt.measure.noise as noise
import greenopt.measure.stats as stats
from greenopt.config import Protocol
from greenopt.errors import ConfigError, MeterError
from greenopt.measure.base import Meter
from greenopt.runtimes import Runtime, as_runtime
from greenopt.records import (
    TIER_ORDER,
    Comparison,
    DeviceInfo,
    EnergyMeasurement,
    Tier,
    TrialFigures,
    WindowResult,
    downgrade,
)

log = logging.getLogger(__name__)

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"
MIN_TRIALS = 5  # GO-1: at least 5 trials per variant

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------- prompts


@functools.lru_cache(maxsize=1)
def prompt_texts() -> tuple[str, ...]:
    """The shipped GO-1 prompt texts (``greenopt/data/prompts.jsonl``), in file order."""
    try:
        lines = PROMPTS_PATH.read_text(encoding="utf-8").splitlines()
    except OSError:
        raise ConfigError(f"{PROMPTS_PATH} is missing; regenerate it with scripts/make_prompts.py") from None
    return tuple(json.loads(line)["text"] for line in lines if line.strip())


def load_prompts(tokenizer, protocol: Protocol) -> torch.Tensor:
    """Tokenizes the GO-1 prompts with the model's own tokenizer, each exactly ``prompt_tokens`` long.

    Each prompt is tokenized with the tokenizer's special tokens (e.g. BOS) and truncated to
    ``protocol.prompt_tokens``; a text too short is continued with the following texts
    (joined by a newline), so no padding is ever needed.

    Args:
        tokenizer: a Hugging Face tokenizer (callable, returns ``input_ids``).
        protocol: gives ``prompt_tokens``.

    Returns:
        A ``torch.long`` tensor ``[n_prompts, protocol.prompt_tokens]`` on the CPU.

    Raises:
        ConfigError: all prompt text together is shorter than ``prompt_tokens``.
    """
    texts = prompt_texts()
    want = protocol.prompt_tokens
    rows = []
    for i in range(len(texts)):
        text, j = texts[i], i
        ids = _encode(tokenizer, text)
        while len(ids) < want:
            j += 1
            if j - i >= len(texts):
                raise ConfigError(f"prompt_tokens={want} exceeds the {len(ids)} tokens of all GO-1 "
                                  "prompt text; choose a smaller prompt length")
            text = text + "\n" + texts[j % len(texts)]
            ids = _encode(tokenizer, text)
        rows.append(ids[:want])
    return torch.tensor(rows, dtype=torch.long)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# ---------------------------------------------------------------------------- one model's runs


class _Runner:
    """Runs the workload for one model and keeps its windows."""

    def __init__(self, runtime: Runtime, prompts: torch.Tensor, protocol: Protocol, meter: Meter) -> None:
        self.runtime, self.protocol, self.meter = runtime, protocol, meter
        if runtime.module is not None:
            meter.check_model(runtime.module)  # NVML: every weight on the one metered GPU
        self.prompts = prompts
        self._cursor = 0
        self.trials: list[TrialFigures] = []
        self.windows: list[WindowResult] = []
        self.prefill_j_per_call: float | None = None
        self.full, self.prefill_only = protocol.new_tokens, 1

    def _generate(self, new_tokens: int) -> int:
        """One generate call on the next ``batch_size`` prompts; returns new tokens generated."""
        n, b = self.prompts.shape[0], self.protocol.batch_size
        rows = [(self._cursor + k) % n for k in range(b)]
        self._cursor = (self._cursor + b) % n
        out = self.runtime.generate(self.prompts[rows], new_tokens)
        if tuple(out.shape) != (b, new_tokens):
            raise RuntimeError(f"{self.runtime.name} generated {tuple(out.shape)} tokens, "
                               f"expected exactly {(b, new_tokens)}")
        return b * new_tokens

    def warm_up(self, progress: Progress | None) -> None:
        p = self.protocol
        done, t0 = 0, time.perf_counter()
        while done < p.warmup_generations or time.perf_counter() - t0 < p.warmup_min_s:
            self._generate(self.full)
            done += 1
            _report(progress, "warmup", done, max(done, p.warmup_generations))
        self.meter.sync()
        self._cursor = 0  # every model's trials see the prompts in the same order

    def trial(self) -> TrialFigures:
        p = self.protocol
        min_s = max(p.trial_min_s, self.meter.min_window_s)
        calls = tokens = 0
        with self.meter.window() as w:
            t0 = time.perf_counter()
            while True:
                tokens += self._generate(self.full)
                calls += 1
                if tokens >= p.trial_min_tokens and time.perf_counter() - t0 >= min_s:
                    break
        res = _result(w)
        self.windows.append(res)
        fig = TrialFigures(energy_j=res.energy_j, duration_s=res.duration_s, generated_tokens=tokens,
                           prompt_tokens=calls * p.batch_size * p.prompt_tokens)
        self.trials.append(fig)
        return fig

    def prefill(self) -> None:
        p = self.protocol
        min_calls = int(np.median([self._calls(t) for t in self.trials]))
        min_s = max(self.meter.min_window_s, p.trial_min_s / 2)
        calls = 0
        with self.meter.window() as w:
            t0 = time.perf_counter()
            while calls < min_calls or time.perf_counter() - t0 < min_s:
                self._generate(self.prefill_only)
                calls += 1
        res = _result(w)
        self.windows.append(res)
        self.prefill_j_per_call = res.energy_j / calls

    def _calls(self, t: TrialFigures) -> int:
        return t.generated_tokens // (self.protocol.batch_size * self.protocol.new_tokens)

    def result(self, device: DeviceInfo, idle: WindowResult | None, foreign: bool) -> EnergyMeasurement:
        return _summarise(self, device, idle, foreign)


# ---------------------------------------------------------------------------- public verbs


def measure(model, tokenizer, protocol: Protocol, meter: Meter, *,
            progress: Progress | None = None) -> EnergyMeasurement:
    """Measures one model under protocol GO-1.

    Args:
        model: a :class:`~greenopt.runtimes.Runtime`, or a Hugging Face causal LM (run on
            :class:`~greenopt.runtimes.TransformersRuntime`), on cuda or cpu.
        tokenizer: the model's own tokenizer.
        protocol: the protocol (``protocol_preset("go1")``, ``"cpu"``, ...).
        meter: the energy meter (``select_meter()``).
        progress: optional ``progress(stage, done, total)``; stages ``idle``, ``warmup``,
            ``trials``, ``prefill``.

    Returns:
        The median J/token with its bootstrap 95% interval, per-trial figures, decode and
        prefill figures, tokens/s, mean and idle W, CV, tier and validity flags.

    Raises:
        MeterError: the meter failed or reported no energy.
        ConfigError: the prompts cannot fill ``protocol.prompt_tokens``.

    Example:
        >>> from greenopt.testing import tiny_llama, tiny_tokenizer, FakeMeter
        >>> from greenopt.config import protocol_preset
        >>> m = measure(tiny_llama(), tiny_tokenizer(), protocol_preset("smoke"), FakeMeter())
        >>> m.trials[0].generated_tokens
        4
    """
    runtime = as_runtime(model, tokenizer)
    runner = _Runner(runtime, load_prompts(tokenizer, protocol), protocol, meter)
    device = meter.device()
    with runtime.measuring():
        foreign = _has_foreign(meter)
        idle = _idle_window(meter, protocol, progress)
        runner.warm_up(progress)
        for i in range(protocol.trials):
            runner.trial()
            _report(progress, "trials", i + 1, protocol.trials)
        runner.prefill()
        _report(progress, "prefill", 1, 1)
        foreign = foreign or _has_foreign(meter)
    return runner.result(device, idle, foreign)


def compare(baseline_model, candidate_model, tokenizer, protocol: Protocol, meter: Meter, *,
            progress: Progress | None = None, order_seed: int | None = None) -> Comparison:
    """Measures a candidate against its baseline in one run, trials alternating A B A B ...

    The side that goes first and the order of the prompts (the same for both sides) are drawn
    from ``order_seed`` (default: a fresh random seed, so repeated comparisons do not all start
    on the same side; shared/ENERGY.md §2); both are recorded. The idle window is shared.
    EEI = 100 x median E_tok(candidate) / median E_tok(baseline), with an *in-run* 95% interval
    from a paired block bootstrap over adjacent A/B trial pairs
    (:func:`~greenopt.measure.stats.eei_interval_paired`): it holds what varies within this run,
    not what differs between runs (:func:`compare_repeated` and ``greenopt calibrate`` add that).

    Args:
        baseline_model: the uncompressed model (a runtime, or a transformers model).
        candidate_model: the compressed variant (same tokenizer), on its own runtime.
        tokenizer: the models' tokenizer.
        protocol: the protocol.
        meter: the energy meter; both sides use it, so tiers never mix.
        progress: optional ``progress(stage, done, total)``.
        order_seed: seed of the starting side and the prompt order (None: drawn fresh).

    Returns:
        The comparison, with both measurements, the side that went first and the order seed.

    Raises:
        MeterError: the meter failed or reported no energy.
        ConfigError: the prompts cannot fill ``protocol.prompt_tokens``.
    """
    order_seed = secrets.randbits(32) if order_seed is None else order_seed
    rng = np.random.default_rng(order_seed)
    first = int(rng.integers(2))
    prompts = load_prompts(tokenizer, protocol)
    prompts = prompts[torch.as_tensor(rng.permutation(len(prompts)))]
    runtimes = [as_runtime(m, tokenizer) for m in (baseline_model, candidate_model)]
    runners = [_Runner(rt, prompts, protocol, meter) for rt in runtimes]
    order = [runners[first], runners[1 - first]]
    device = meter.device()
    total = 2 * protocol.trials
    with runtimes[0].measuring(), runtimes[1].measuring():
        foreign = _has_foreign(meter)
        idle = _idle_window(meter, protocol, progress)
        for r in order:
            r.warm_up(progress)
        for i in range(protocol.trials):
            for k, r in enumerate(order):
                r.trial()
                _report(progress, "trials", 2 * i + k + 1, total)
        for k, r in enumerate(order):
            r.prefill()
            _report(progress, "prefill", k + 1, 2)
        foreign = foreign or _has_foreign(meter)
    base, cand = (r.result(device, idle, foreign) for r in runners)
    base_jpt = [t.joules_per_token for t in base.trials]
    cand_jpt = [t.joules_per_token for t in cand.trials]
    eei = stats.eei_point(base_jpt, cand_jpt)
    ci = stats.eei_interval_paired(base_jpt, cand_jpt, protocol.bootstrap_resamples, protocol.seed)
    log.info("EEI %.1f [%.1f, %.1f] in-run (%s, %s first)", eei, ci[0], ci[1], protocol.id, _SIDES[first])
    return Comparison(eei=eei, eei_ci=ci, baseline=base, candidate=cand, first=_SIDES[first], order_seed=order_seed)


_SIDES = ("baseline", "candidate")


def compare_repeated(pair: Callable[[int], tuple], tokenizer, protocol: Protocol, meter: Meter, repeats: int, *,
                     floor_log_sd: float | None = None, progress: Progress | None = None) -> Comparison:
    """``repeats`` independent comparisons of the same pair, combined into one reported figure.

    ``pair(r)`` builds fresh copies of both models for comparison ``r`` (the variant re-applied,
    so memory placement and process state differ as they would on a rerun); each comparison
    draws its own starting side and prompt order. The EEI and interval come from
    :func:`~greenopt.measure.stats.combine_eei` on log EEI (between-comparison variance, never
    below the machine's noise floor, plus the mean in-run variance); the measurements shown are
    those of the comparison whose EEI is the median, and ``runs`` lists every comparison's EEI.

    The noise floor is ``floor_log_sd`` when given, else :func:`greenopt.measure.noise.floor_for`
    (this machine's ``greenopt calibrate`` figure for the meter, protocol and thread count; for an
    uncalibrated estimate, the stated default). A single comparison with a floor comes back
    ``floored``; with none, ``in-run``.

    Raises:
        MeterError, ConfigError: as :func:`compare`.
    """
    if repeats < 1:
        raise ConfigError(f"comparisons: {repeats}; pass 1 or more")
    runs = []
    for r in range(repeats):
        base, cand = pair(r)
        runs.append(compare(base, cand, tokenizer, protocol, meter, progress=_prefixed(progress, r, repeats)))
        del base, cand
    choice = (noise.FloorChoice(floor_log_sd, "given by the caller" if floor_log_sd else None)
              if floor_log_sd is not None else
              noise.floor_for(meter.name, runs[0].tier, protocol.id, torch.get_num_threads()))
    if repeats == 1 and choice.log_sd == 0.0:
        return runs[0]
    eei, ci = stats.combine_eei([c.eei for c in runs], [c.eei_ci for c in runs], choice.log_sd)
    mid = sorted(runs, key=lambda c: c.eei)[(len(runs) - 1) // 2]
    log.info("EEI %.1f [%.1f, %.1f] over %d comparisons (%s, floor %.3f)", eei, ci[0], ci[1], repeats,
             protocol.id, choice.log_sd)
    return mid.model_copy(update={"eei": eei, "eei_ci": ci, "interval": "repeated" if repeats > 1 else "floored",
                                  "runs": tuple(c.eei for c in runs), "floor_log_sd": choice.log_sd,
                                  "floor_source": choice.source})


def _prefixed(progress: Progress | None, r: int, repeats: int) -> Progress | None:
    if progress is None or repeats == 1:
        return progress
    return lambda stage, done, total: progress(f"comparison {r + 1}/{repeats}: {stage}", done, total)


# ---------------------------------------------------------------------------- helpers


def _summarise(r: _Runner, device: DeviceInfo, idle: WindowResult | None, foreign: bool) -> EnergyMeasurement:
    p = r.protocol
    jpt = [t.joules_per_token for t in r.trials]
    med = stats.median(jpt)
    if not med > 0:
        raise MeterError(f"meter {r.meter.name!r} reported no energy over the trials; check the meter "
                         "(greenopt env) or lengthen the trials")
    cv = stats.coefficient_of_variation(jpt)
    flags: list[str] = []
    for w in r.windows + ([idle] if idle else []):
        flags.extend(f for f in w.flags if f not in flags)
    if cv > p.cv_max:
        flags.append("high-cv")
    if len(r.trials) < MIN_TRIALS:
        flags.append("few-trials")
    if foreign and "foreign-gpu-processes" not in flags:
        flags.append("foreign-gpu-processes")
    source: Tier = max((w.tier for w in r.windows), key=TIER_ORDER.index)
    energy = sum(t.energy_j for t in r.trials)
    duration = sum(t.duration_s for t in r.trials)
    tokens = sum(t.generated_tokens for t in r.trials)
    return EnergyMeasurement(
        joules_per_token=med,
        joules_per_token_ci=stats.bootstrap_median_ci(jpt, p.bootstrap_resamples, p.seed),
        trials=tuple(r.trials),
        decode_joules_per_token=_decode_jpt(r),
        prefill_joules_per_prompt_token=(r.prefill_j_per_call / (p.batch_size * p.prompt_tokens)
                                         if r.prefill_j_per_call is not None else None),
        tokens_per_s=tokens / duration if duration > 0 else 0.0,
        mean_power_w=energy / duration if duration > 0 else 0.0,
        idle_power_w=idle.energy_j / idle.duration_s if idle and idle.duration_s > 0 else None,
        cv=cv, tier=downgrade(source) if flags else source, source_tier=source,
        device=device, protocol_id=p.id, flags=tuple(flags),
    )


def _decode_jpt(r: _Runner) -> float | None:
    p = r.protocol
    if p.new_tokens < 2 or r.prefill_j_per_call is None:
        return None
    full_j_per_call = stats.median([t.energy_j / r._calls(t) for t in r.trials])
    decode = (full_j_per_call - r.prefill_j_per_call) / (p.batch_size * (p.new_tokens - 1))
    if decode <= 0:
        log.warning("prefill-only calls cost as much as full generations (noise?); decode J/token not reported")
        return None
    return decode


def _idle_window(meter: Meter, protocol: Protocol, progress: Progress | None) -> WindowResult:
    idle_s = max(meter.min_window_s, min(2.0, protocol.trial_min_s / 2), 0.05)
    with meter.window() as w:
        time.sleep(idle_s)
    _report(progress, "idle", 1, 1)
    return _result(w)


def _has_foreign(meter: Meter) -> bool:
    check = getattr(meter, "foreign_gpu_processes", None)
    if check is None:
        return False
    pids = check()
    if pids:
        log.warning("other processes use the GPU during the measurement: %s", ", ".join(map(str, pids)))
    return bool(pids)


def _result(w) -> WindowResult:
    if w.result is None:
        raise MeterError("meter window closed without a result")
    return w.result


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
