"""Side-by-side benchmark records: greenopt's picks against single-technique baselines.

The orchestration lives in ``scripts/bench_baselines.py``; this module holds what it is
built from and what the tests check: the :class:`Point` record, the dequantized twin used to
score weight-only quantized variants at fp32 speed (checked against the real modules), the
mean accuracy with its standard error, Pareto dominance with its margins, and the plot.

Example:
    >>> p = Point(name="a", kind="baseline", variant_hash="x", eei=80.0, eei_ci=(75.0, 85.0),
    ...           accuracy=0.5, accuracy_se=0.01)
    >>> q = Point(name="b", kind="baseline", variant_hash="y", eei=90.0, eei_ci=(85.0, 95.0),
    ...           accuracy=0.45, accuracy_se=0.01)
    >>> dominance(p, q).dominates
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from greenopt._io import write_bytes
from greenopt.config import Variant
from greenopt.records import Record, TaskScore
from greenopt.report.plot import bands

# Weight-only methods: the layer computes x @ dequant(W).T, so a dense fp32 layer holding
# dequant(W) gives the same outputs. bnb LLM.int8 quantizes activations too: never twinned.
WEIGHT_ONLY = frozenset({"bnb_nf4", "bnb_fp4", "hqq", "gptq", "rtn", "torchao_int8"})


class Point(Record):
    """One benchmarked model: energy against the shared baseline, accuracy, size, speed."""

    name: str
    kind: str  # "uncompressed" | "baseline" | "greenopt"
    variant_hash: str
    steps: str = ""
    target: str | None = None  # greenopt picks: the class searched for
    eei: float
    eei_ci: tuple[float, float]
    joules_per_token: float | None = None
    joules_per_token_ci: tuple[float, float] | None = None
    tier: str = ""
    device: str = ""
    protocol_id: str = ""
    display: str = ""
    worst_letter: str = ""
    tokens_per_s: float | None = None
    tokens_per_s_ratio: float | None = None
    weight_bytes: int | None = None
    fast_kernel: bool | None = None
    flags: tuple[str, ...] = ()
    accuracy: float | None = None
    accuracy_se: float | None = None
    scores: tuple[TaskScore, ...] = ()
    scored_on: str = ""  # "model" or "dequantized twin (...)"
    apply_s: float = 0.0
    error: str | None = None


def mean_accuracy(scores: Sequence[TaskScore]) -> tuple[float, float]:
    """Unweighted mean over tasks and its standard error (tasks independent)."""
    accs = [s for s in scores if s.higher_is_better]
    if not accs:
        raise ValueError("no accuracy task among the scores")
    mean = sum(s.value for s in accs) / len(accs)
    se = math.sqrt(sum((s.stderr or 0.0) ** 2 for s in accs)) / len(accs)
    return mean, se


def group_near(want: int, widths: Sequence[int]) -> int:
    """A group size that divides every input width: ``want`` itself, else the nearest such
    multiple of 8 (ties to the larger). GPTQ's usual 128 does not divide SmolLM2's 576."""
    g = math.gcd(*widths)
    divs = [d for d in range(8, g + 1, 8) if g % d == 0] or [g]
    return min(divs, key=lambda d: (abs(d - want), -d))


def twinnable(variant: Variant) -> bool:
    """True when every quantize step is weight-only (and there is at least one)."""
    methods = [s.method for s in variant.steps if s.kind == "quantize"]
    methods += [o.method for s in variant.steps if s.kind == "quantize" for o in s.overrides if o.method]
    return bool(methods) and all(m in WEIGHT_ONLY for m in methods)


def _quantized_linear(mod: torch.nn.Module) -> bool:
    if not (hasattr(mod, "in_features") and hasattr(mod, "out_features")):
        return False
    if type(mod) is not torch.nn.Linear:
        return True
    return type(mod.weight) not in (torch.nn.Parameter, torch.Tensor)


@torch.inference_mode()
def effective_weight(mod: torch.nn.Module, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) such that ``mod(x) == x @ W.T + b`` for a weight-only quantized linear layer.

    Read through the layer's own forward on the identity, so it is exact for any backend
    whose forward is ``x @ dequant(W).T + b``.
    """
    eye = torch.eye(mod.in_features, dtype=dtype, device=_device(mod))
    bias = mod(torch.zeros(1, mod.in_features, dtype=dtype, device=eye.device))[0]
    return (mod(eye) - bias).T.contiguous(), bias


class DequantizedTwin:
    """Swaps a model's quantized linear layers for dense ones holding their dequantized weights.

    In place and undoable: ``with DequantizedTwin(model) as twin: evaluate(model, ...)``;
    ``twin.agreement`` compares the twin's logits with the real model's on ``check_ids``.
    """

    def __init__(self, model: torch.nn.Module, check_ids: torch.Tensor | None = None) -> None:
        self.model, self.check_ids = model, check_ids
        self._saved: dict[str, torch.nn.Module] = {}
        self.agreement: dict[str, float] = {}

    def __enter__(self) -> "DequantizedTwin":
        ref = self._logits() if self.check_ids is not None else None
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        for name, mod in list(self.model.named_modules()):
            if name and _quantized_linear(mod):
                w, b = effective_weight(mod, dtype)
                dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=bool(b.abs().max() > 0),
                                        dtype=dtype, device=w.device)
                with torch.no_grad():
                    dense.weight.copy_(w)
                    if dense.bias is not None:
                        dense.bias.copy_(b)
                self._saved[name] = mod
                self.model.set_submodule(name, dense)
        if ref is not None:
            got = self._logits()
            self.agreement = {"top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                              "max_abs_diff": float((got - ref).abs().max()),
                              "logit_std": float(ref.std())}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, mod in self._saved.items():
            self.model.set_submodule(name, mod)
        self._saved.clear()

    @property
    def swapped(self) -> int:
        return len(self._saved)

    @torch.inference_mode()
    def _logits(self) -> torch.Tensor:
        return self.model(self.check_ids.to(_device(self.model))).logits.float()


def _device(mod: torch.nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Dominance:
    """How ``a`` compares with ``b``: dominance and the margins (positive favours ``a``)."""

    dominates: bool
    accuracy_gain: float  # a.accuracy - b.accuracy
    accuracy_z: float  # the gain over its standard error
    eei_saving: float  # b.eei - a.eei
    eei_separated: bool  # the 95% intervals do not overlap


def dominance(a: Point, b: Point) -> Dominance:
    """Pareto dominance on (accuracy up, EEI down), point estimates; margins say how sure."""
    assert a.accuracy is not None and b.accuracy is not None
    gain, saving = a.accuracy - b.accuracy, b.eei - a.eei
    se = math.hypot(a.accuracy_se or 0.0, b.accuracy_se or 0.0)
    z = gain / se if se > 0 else math.copysign(math.inf, gain) if gain else 0.0
    dom = gain >= 0 and saving >= 0 and (gain > 0 or saving > 0)
    sep = a.eei_ci[1] < b.eei_ci[0] or b.eei_ci[1] < a.eei_ci[0]
    return Dominance(dom, gain, z, saving, sep)


def verdict(pick: Point, baselines: Iterable[Point]) -> list[str]:
    """One line per baseline: dominated or not, and by how much."""
    lines = []
    for b in baselines:
        if b.accuracy is None or b.error:
            lines.append(f"  - {b.name}: not compared ({b.error or 'no accuracy'})")
            continue
        d = dominance(pick, b)
        sure = (f"accuracy {d.accuracy_gain * 100:+.1f} pts (z {d.accuracy_z:+.1f}), "
                f"EEI {-d.eei_saving:+.1f} ({'intervals apart' if d.eei_separated else 'intervals overlap'})")
        word = "dominated" if d.dominates else "NOT dominated"
        lines.append(f"  - {b.name} ({b.display}): {word}; {sure}")
    return lines


def plot_png(points: Sequence[Point], scheme: Any, path: str, *, front: Sequence[tuple[float, float]] = (),
             title: str = "") -> None:
    """Accuracy vs EEI with the class bands, interval bars, baselines as circles, picks as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    scored = [p for p in points if p.accuracy is not None]
    x_max = max([130.0] + [p.eei_ci[1] * 1.05 for p in scored])
    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    for letter, lo, hi, colour in bands(scheme, x_max):
        ax.axvspan(lo, hi, color=colour, alpha=0.18, lw=0)
        ax.text((lo + hi) / 2, 1.0, letter, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=11, fontweight="bold")
    if front:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, "d--", color="grey", ms=4, lw=0.8, alpha=0.7, label="search front (search-fidelity eval)")
    for i, p in enumerate(scored):
        star = p.kind == "greenopt"
        err = [[p.eei - p.eei_ci[0]], [p.eei_ci[1] - p.eei]]
        ax.errorbar([p.eei], [p.accuracy], xerr=err, yerr=[[p.accuracy_se or 0]] * 2,
                    fmt="*" if star else "o", ms=14 if star else 6, color="#1f4e9c" if star else "#333333",
                    ecolor="#777777", elinewidth=0.8, capsize=2, zorder=3)
        ax.annotate(p.name, (p.eei, p.accuracy), textcoords="offset points", xytext=(6, (4, -12, 14)[i % 3]), fontsize=8)
    ax.set_xlim(0, x_max)
    ax.set_xlabel("EEI = 100 x J/token(variant) / J/token(uncompressed), same run (lower is better)")
    ax.set_ylabel("mean accuracy over tasks (± 1 SE)")
    if title:
        ax.set_title(title, fontsize=9, pad=18)
    if front:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    import io
    from pathlib import Path


    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(Path(path), buf.getvalue())
