"""bitsandbytes 4-bit export on both CPU branches: with and without the AVX-512-BF16 repack.

On CPUs with AVX-512-BF16, ``Linear4bit.forward`` (eval, no grad) repacks the weight once for the
fused CPU kernel; elsewhere it never does. ``Linear4bit.__init__`` reads
``bitsandbytes.nn.modules.has_avx512bf16`` into ``support_avx512bf16_for_cpu``, so patching that
name forces either branch for every module built afterwards (greenopt's, the greenopt loader's and
transformers'). The fused kernel itself is registered only on such CPUs, so the end-to-end
repack test needs one; the layout test repacks by hand and runs anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from greenopt.config import QuantizeStep, QuantOverride, Target, Variant  # noqa: E402
from greenopt.ship import export, load  # noqa: E402
from greenopt.testing import tiny_llama, tiny_tokenizer  # noqa: E402

PROBE = torch.arange(1, 20).unsqueeze(0)
VARIANTS = {
    "nf4": (Variant(steps=(QuantizeStep(method="bnb_nf4", bits=4, group_size=64),)), "transformers"),
    "fp4": (Variant(steps=(QuantizeStep(method="bnb_fp4", bits=4, group_size=64),)), "transformers"),
    "mixed": (Variant(steps=(QuantizeStep(method="bnb_nf4", bits=4, group_size=64, overrides=(
        QuantOverride(target=Target(layers="0"), method="bnb_int8", bits=8),)),)), "greenopt"),
}


def _real_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _force(monkeypatch, repack: bool) -> None:
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: repack)


def _four_bit(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _applied(name: str):
    from greenopt.compress import apply

    model = tiny_llama()
    apply(model, VARIANTS[name][0], tokenizer=tiny_tokenizer())
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROBE).logits


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _check_reloads(model, want, folder: Path, loader: str) -> None:
    from transformers import AutoModelForCausalLM

    m = export(model, tiny_tokenizer(), VARIANTS["nf4"][0], None, folder)
    assert m.loader == loader, m.loader_reason
    assert torch.equal(_logits(load(folder)), want)
    if loader == "transformers":
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder).eval()), want)
    assert torch.equal(_logits(model), want), "export changed the measured model"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_without_the_cpu_repack_4bit_reloads_with_the_same_logits(name, tmp_path, monkeypatch):
    _force(monkeypatch, False)
    model = _applied(name)
    want = _logits(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _four_bit(model).values())
    _check_reloads(model, want, tmp_path / "out", VARIANTS[name][1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_with_the_cpu_repack_4bit_reloads_with_the_same_logits(name, tmp_path, monkeypatch):
    if not _real_avx512bf16():
        pytest.skip("needs a CPU with AVX-512-BF16: bitsandbytes registers its fused 4-bit CPU kernel, the one "
                    "that reads the repacked layout, only there (the layout itself is tested by "
                    "test_a_repacked_4bit_weight_is_saved_in_the_canonical_layout)")
    _force(monkeypatch, True)
    model = _applied(name)
    want = _logits(model)  # the first eval forward repacks
    four = _four_bit(model)
    assert four and all(m.weight.quant_state.packing_format_for_cpu for m in four.values())
    _check_reloads(model, want, tmp_path / "out", VARIANTS[name][1])
    assert all(m.weight.quant_state.packing_format_for_cpu for m in four.values()), "export un-repacked the model"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_repacked_4bit_weight_is_saved_in_the_canonical_layout(name, tmp_path, monkeypatch):
    """Repacks by hand (pure torch, any CPU), exports, and reloads on the non-repack path."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    _force(monkeypatch, False)
    model = _applied(name)
    four = _four_bit(model)
    canonical = {}
    for n, m in four.items():
        qs = m.weight.quant_state
        qs.absmax = qs.absmax.to(torch.bfloat16).float()  # what the fused kernel uses; exact in float32
        canonical[n] = (m.weight.data.clone(), qs.absmax.clone(), qs.dtype)
    want = _logits(model)
    for m in four.values():
        m.weight.data, _ = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    packed = {n: (m.weight.data.clone(), m.weight.quant_state, m.weight.quant_state.absmax) for n, m in four.items()}

    export(model, tiny_tokenizer(), VARIANTS[name][0], None, tmp_path / "out")
    saved = _saved(tmp_path / "out")
    for n, (data, absmax, dtype) in canonical.items():
        assert torch.equal(saved[f"{n}.weight"], data)
        assert saved[f"{n}.weight.absmax"].dtype == torch.float32
        assert torch.equal(saved[f"{n}.weight.absmax"], absmax)
        assert f"{n}.weight.nested_absmax" not in saved
    for n, m in four.items():  # the measured model is left exactly as it was
        data, qs, absmax = packed[n]
        assert torch.equal(m.weight.data, data) and m.weight.quant_state is qs and qs.absmax is absmax
        assert qs.packing_format_for_cpu and qs.dtype == torch.bfloat16

    reloaded = load(tmp_path / "out")
    for n, m in _four_bit(reloaded).items():
        assert torch.equal(m.weight.data, canonical[n][0])
        assert m.weight.quant_state.dtype == canonical[n][2]
    assert torch.equal(_logits(reloaded), want)
