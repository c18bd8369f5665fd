#!/usr/bin/env python3
"""GPU energy check: a random ~1B Llama, five variants, the NVML energy counter, JSON out.

On a machine with one NVIDIA GPU and no network (scripts/gpu_check.sh wraps this in a time
limit). Builds a randomly initialised Llama-architecture model from a config (hidden 2048,
16 layers, FFN 8192, 32 heads / 8 KV heads, vocab 32000: about 1.0B parameters; no download)
and measures, with greenopt's own meters and protocol workload, five variants:

- ``baseline``: bf16;
- ``int8-wo``: torchao int8 weight-only (greenopt move ``quantize`` method ``torchao_int8``);
- ``int4-wo``: torchao int4 weight-only, group 128, tinygemm layout. greenopt has no int4
  torchao move, so this script applies ``Int4WeightOnlyConfig`` itself (CUDA only);
- ``sparse-2:4``: 2:4 magnitude pruning with torch's semi-structured sparse kernels
  (greenopt move ``prune`` pattern ``2:4``);
- ``depth-25%``: 4 of 16 decoder layers dropped (greenopt move ``depth``, layers listed).

Mode ``compare`` runs :func:`greenopt.measure.compare` (trials A B A B) per candidate;
``measure`` runs :func:`greenopt.measure.measure` once per variant and takes the EEI from
the medians (an unpaired, in-run interval). ``auto`` picks ``compare`` when it fits the time
budget at the meter's minimum window (100 x the counter's update period), else ``measure``.

Prints one JSON document (J/token, EEI vs baseline, tier, flags, device, driver, protocol id
per variant) to stdout and writes it to ``--out`` (default ``$OUT/gpu_check.json`` when
``$OUT`` is set) after every variant, so a run cut short keeps what it measured.

Usage:
    scripts/gpu_check.sh [--mode auto|compare|measure] [--budget-s 440]
    python scripts/gpu_check.py --fake      # CPU: fake NVML, tiny model, a few seconds

Exit status: 0 every variant measured (or skipped for time), 1 a variant or the meter
failed, 2 no CUDA device (without ``--fake``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import types
from pathlib import Path

log = logging.getLogger("gpu_check")

REAL_DIMS = dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=32000)
FAKE_DIMS = dict(hidden=64, layers=4, intermediate=256, heads=4, kv_heads=2, vocab=None)
VARIANTS = ("baseline", "int8-wo", "int4-wo", "sparse-2:4", "depth-25%")


class Skipped(Exception):
    """A variant that cannot run here (e.g. a CUDA-only kernel in --fake mode)."""


# ---------------------------------------------------------------------------- fake NVML


def fake_pynvml(power_w: float = 100.0, period_s: float = 0.002) -> types.ModuleType:
    """A stand-in ``pynvml``: a counter of ``power_w`` x wall time that updates every ``period_s``."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def energy_mj(handle) -> int:
        steps = int(time.perf_counter() / period_s)
        return int(steps * period_s * power_w * 1000)

    nv.NVMLError, nv.NVMLError_NotSupported, nv.NVML_DEVICE_MIG_ENABLE = NVMLError, NVMLError_NotSupported, 1
    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetHandleByPciBusId = lambda bus: f"fake-gpu@{bus}"
    nv.nvmlDeviceGetTotalEnergyConsumption = energy_mj
    nv.nvmlDeviceGetPowerUsage = lambda h: int(power_w * 1000)
    nv.nvmlDeviceGetName = lambda h: "Fake NVML GPU (gpu_check --fake)"
    nv.nvmlSystemGetDriverVersion = lambda: "fake"
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: 300_000
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: []
    nv.nvmlDeviceGetMigMode = lambda h: [0, 0]
    return nv


# ---------------------------------------------------------------------------- model and variants


def build_model(dims: dict, device: str, dtype, vocab: int):
    """A randomly initialised LlamaForCausalLM from ``dims`` on ``device`` in ``dtype`` (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=dims["vocab"] or vocab, hidden_size=dims["hidden"],
                      intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
                      num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def apply_variant(name: str, model, device: str) -> dict:
    """Turns ``model`` (a copy of the baseline) into variant ``name`` in place; returns its facts."""
    from greenopt.compress import accounting, apply
    from greenopt.config import DepthStep, PruneStep, QuantizeStep, Variant

    if name == "baseline":
        return {"weight_bytes": accounting.weight_bytes(model), "fast_kernel": None, "notes": []}
    if name == "int4-wo":
        return _int4_weight_only(model, device)
    n = model.config.num_hidden_layers
    steps = {
        "int8-wo": [QuantizeStep(method="torchao_int8", bits=8, group_size=None)],
        "sparse-2:4": [PruneStep(method="magnitude", pattern="2:4", sparsity=0.5)],
        "depth-25%": [DepthStep(drop=max(1, n // 4), layers=f"{n - 1 - max(1, n // 4)}-{n - 2}")],
    }[name]
    report = apply(model, Variant(name=name, steps=steps))
    notes = [note for s in report.steps for note in s.notes]
    return {"weight_bytes": report.weight_bytes_after, "fast_kernel": report.fast_kernel, "notes": notes}


def _int4_weight_only(model, device: str) -> dict:
    # greenopt has no torchao int4 move; torchao's tinygemm int4 kernel is CUDA-only.
    if not device.startswith("cuda"):
        raise Skipped("int4 weight-only needs CUDA (torchao's tinygemm int4 kernel)")
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    from greenopt.compress import accounting

    group = 128 if model.config.hidden_size % 128 == 0 else 32
    cfg = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                               set_inductor_config=False)
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    return {"weight_bytes": accounting.weight_bytes(model), "fast_kernel": True,
            "notes": [f"torchao Int4WeightOnlyConfig group {group}, tile_packed_to_4d (tinygemm), applied "
                      "by gpu_check (greenopt has no int4 torchao move)"]}


# ---------------------------------------------------------------------------- measuring


def make_protocol(fake: bool, meter):
    """The check's protocol: smoke-sized for --fake, else p128-n64 with windows of the meter's minimum."""
    from greenopt.config import Protocol, protocol_preset

    if fake:
        return protocol_preset("smoke", bootstrap_resamples=200)
    return Protocol(preset="gpu-check", prompt_tokens=128, new_tokens=64, warmup_generations=2, warmup_min_s=2.0,
                    trials=5, trial_min_s=meter.min_window_s, trial_min_tokens=64, bootstrap_resamples=1000)


def plan_mode(requested: str, window_s: float, gen_s: float, protocol, candidates: int,
              left_s: float) -> tuple[str, float]:
    """``compare`` or ``measure`` for ``requested="auto"`` by the time each needs; returns (mode, s/variant)."""
    win = max(window_s, gen_s) + gen_s / 2
    warm = max(protocol.warmup_min_s, protocol.warmup_generations * gen_s)
    per_compare = win + 2 * warm + 2 * protocol.trials * win + 2 * win
    per_measure = win + warm + protocol.trials * win + win
    if requested == "compare" or (requested == "auto" and candidates * per_compare <= left_s):
        return "compare", per_compare
    return "measure", per_measure


def figures(m) -> dict:
    """The JSON figures of one EnergyMeasurement."""
    return {"joules_per_token": m.joules_per_token, "joules_per_token_ci": list(m.joules_per_token_ci),
            "decode_joules_per_token": m.decode_joules_per_token,
            "prefill_joules_per_prompt_token": m.prefill_joules_per_prompt_token,
            "tokens_per_s": m.tokens_per_s, "mean_power_w": m.mean_power_w, "idle_power_w": m.idle_power_w,
            "cv": m.cv, "tier": m.tier, "source_tier": m.source_tier, "flags": list(m.flags),
            "trial_joules_per_token": [t.joules_per_token for t in m.trials], "protocol_id": m.protocol_id}


def run_variants(args, meter, model, tokenizer, protocol, device: str, doc: dict, save) -> bool:
    """Measures every variant into ``doc["variants"]``; returns True when none failed."""
    import torch

    from greenopt.errors import GreenoptError

    # What a variant may fail with and the check goes on (torchao asserts for a missing CUDA,
    # kernels raise RuntimeError, OOM included); anything else is a bug and stops the run.
    expected = (GreenoptError, RuntimeError, NotImplementedError, ImportError, AssertionError, ValueError, Skipped)

    gen_s = _time_one_generation(model, tokenizer, protocol, device)
    left_s = args.budget_s - (time.perf_counter() - args.t0)
    mode, per_variant_s = plan_mode(args.mode, meter.min_window_s, gen_s, protocol, len(VARIANTS) - 1, left_s)
    doc.update(mode=mode, generation_s=gen_s, interval=(
        "in-run, paired A/B trials (compare)" if mode == "compare"
        else "in-run, separate measurements (measure; not alternated)"))
    log.info("mode %s (~%.0f s per variant, %.0f s left, window %.1f s)", mode, per_variant_s, left_s,
             meter.min_window_s)
    ok = True
    for name in VARIANTS:
        entry: dict = {"name": name}
        doc["variants"].append(entry)
        if mode == "compare" and name == "baseline":
            entry.update(status="not measured", note="measured beside each candidate")
            continue
        if time.perf_counter() - args.t0 + per_variant_s > args.budget_s:
            entry.update(status="skipped", reason=f"time budget ({args.budget_s:.0f} s) would be exceeded")
            save()
            continue
        t = time.perf_counter()
        try:
            entry.update(_measure_variant(name, mode, model, tokenizer, protocol, meter, device, doc), status="ok")
        except expected as e:
            skipped = isinstance(e, Skipped)
            entry.update(status="skipped" if skipped else "error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            ok = ok and skipped
            if not skipped:
                log.exception("variant %s failed", name)
        finally:
            entry["seconds"] = round(time.perf_counter() - t, 1)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            save()
        figure = f"{entry.get('joules_per_token', 0):.4g} J/token, EEI {entry.get('eei', 0):.1f}"
        log.info("%s: %s (%.0f s) %s", name, entry["status"], entry["seconds"], entry.get("reason") or figure)
    return ok


def _measure_variant(name: str, mode: str, model, tokenizer, protocol, meter, device: str, doc: dict) -> dict:
    """One variant's entry: its facts and figures, and its EEI against the baseline."""
    import greenopt.measure.stats as stats
    from greenopt.measure import compare, measure

    cand = model if name == "baseline" else copy.deepcopy(model)
    entry = apply_variant(name, cand, device)
    if mode == "compare":
        c = compare(model, cand, tokenizer, protocol, meter)
        base = doc["variants"][0]
        if base.get("status") != "ok":
            base.update({**apply_variant("baseline", model, device), **figures(c.baseline)},
                        status="ok", eei=100.0, note=f"from the comparison with {name}")
        return {**entry, **figures(c.candidate), "eei": c.eei, "eei_ci": list(c.eei_ci), "comparison_tier": c.tier}
    m = measure(cand, tokenizer, protocol, meter)
    if name == "baseline":
        return {**entry, **figures(m), "eei": 100.0}
    base_jpt = doc["variants"][0].get("trial_joules_per_token")
    if not base_jpt:
        return {**entry, **figures(m)}
    cand_jpt = [t.joules_per_token for t in m.trials]
    return {**entry, **figures(m), "eei": stats.eei_point(base_jpt, cand_jpt),
            "eei_ci": list(stats.eei_interval(base_jpt, cand_jpt, protocol.bootstrap_resamples, protocol.seed))}


def _time_one_generation(model, tokenizer, protocol, device: str) -> float:
    import torch

    from greenopt.measure.workload import load_prompts

    ids = load_prompts(tokenizer, protocol)[:protocol.batch_size].to(device)
    n = protocol.new_tokens
    took = []
    for _ in range(2):  # the first call pays CUDA/cuBLAS start-up; the second is the one timed
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        took.append(time.perf_counter() - t)
    return took[-1]


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Runs the check; see the module docstring for the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake", action="store_true", help="CPU smoke run: fake NVML, tiny model")
    ap.add_argument("--mode", choices=("auto", "compare", "measure"), default="auto")
    ap.add_argument("--budget-s", type=float, default=440.0,
                    help="time budget for the whole check, s (default 440: inside gpu_check.sh's 480 s limit)")
    ap.add_argument("--device", default="cuda:0", help="CUDA device (default cuda:0)")
    ap.add_argument("--out", help="JSON file (default $OUT/gpu_check.json when $OUT is set)")
    args = ap.parse_args(argv)
    args.t0 = time.perf_counter()

    import torch

    if not args.fake and not torch.cuda.is_available():
        print(f"gpu_check: skipped: no CUDA device (torch {torch.__version__}); run with --fake for the CPU "
              "smoke path", file=sys.stderr)
        return 2
    from greenopt import __version__
    from greenopt.errors import GreenoptError
    from greenopt.measure.nvml import NvmlMeter
    from greenopt.testing import tiny_tokenizer

    device = "cpu" if args.fake else args.device
    index = 0 if args.fake else torch.device(device).index or 0
    try:
        if args.fake:
            torch.set_num_threads(1)  # a tiny model runs fastest on one thread
            sys.modules["pynvml"] = fake_pynvml()
            meter = NvmlMeter(0, pci_bus_id="00000000:01:00.0")
            meter.min_window_s = 0.0  # the fake counter needs no long windows; keeps the smoke run fast
            meter.check_model = lambda model: None  # the fake GPU meters a CPU model
        else:
            meter = NvmlMeter(index)
        tokenizer = tiny_tokenizer()
        dims = FAKE_DIMS if args.fake else REAL_DIMS
        model = build_model(dims, device, torch.float32 if args.fake else torch.bfloat16, len(tokenizer))
        if not args.fake:
            meter.check_model(model)
        protocol = make_protocol(args.fake, meter)
        info = meter.device()
    except GreenoptError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                            else None)
    doc: dict = {
        "check": "greenopt gpu_check", "version": 1, "fake": args.fake, "budget_s": args.budget_s,
        "device": info.model_dump(mode="json"), "meter": meter.name, "meter_tier": meter.tier,
        "counter_period_s": meter.counter_period_s, "min_window_s": meter.min_window_s, "mig": meter.mig,
        "protocol": {"id": protocol.id, **protocol.model_dump(mode="json")},
        "model": {"architecture": "LlamaForCausalLM (random init)", **{k: model.config.to_dict()[k] for k in (
            "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")}, "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype)},
        "runtime": _versions(__version__), "variants": [],
    }

    def save() -> None:
        doc["wall_s"] = round(time.perf_counter() - args.t0, 1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            tmp.replace(out)

    try:
        ok = run_variants(args, meter, model, tokenizer, protocol, device, doc, save)
    except GreenoptError as e:
        doc["error"] = str(e)
        ok = False
        print(f"gpu_check: {e}", file=sys.stderr)
    save()
    print(json.dumps(doc, indent=2))
    return 0 if ok else 1


def _versions(greenopt_version: str) -> dict:
    import torch
    import transformers

    try:
        import torchao  # lazy: torchao

        ao = torchao.__version__
    except ImportError:
        ao = None
    return {"greenopt": greenopt_version, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "torchao": ao, "python": sys.version.split()[0]}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="gpu_check: %(message)s")
    for noisy in ("torchao", "transformers", "greenopt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(main())
