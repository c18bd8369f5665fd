"""4-bit packed Linears take torch's fused int4 CPU kernel with bfloat16 activations, and only then."""

from __future__ import annotations

import pytest
import torch

import greenopt.compress.q_packed as qp
from greenopt.compress import apply
from greenopt.compress.q_packed import PackedLinear, minmax_params, quantize_codes
from greenopt.config import Deploy, QuantizeStep, Variant
from greenopt.runtimes import cast
from greenopt.testing import tiny_llama, tiny_tokenizer

needs_kernel = pytest.mark.skipif(not qp._INT4_CPU, reason="this torch has no _weight_int4pack_mm_for_cpu")


def packed(n=96, k=128, g=32, bits=4, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k).reshape(n, -1, g)
    scale, zero = minmax_params(w, bits)
    codes = quantize_codes(w, scale, zero, bits).reshape(n, k)
    return PackedLinear(codes, scale, zero, bits, g, None, "rtn", compute_dtype=dtype)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = torch._weight_int4pack_mm_for_cpu

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", counted)
    return calls


@needs_kernel
def test_bf16_activations_take_the_fused_kernel_and_match_the_dequantized_weight(kernel_calls):
    m = packed()
    x = torch.randn(2, 3, 128).bfloat16()
    fused = m(x)
    assert kernel_calls and fused.shape == (2, 3, 96) and fused.dtype == torch.bfloat16
    dense = torch.nn.functional.linear(x.float(), m.dequantize(torch.float32))
    cos = torch.nn.functional.cosine_similarity(fused.float().flatten(), dense.flatten(), dim=0)
    assert cos > 0.9999
    assert m.greenopt_fast_kernel


@needs_kernel
def test_fp32_activations_and_other_bit_widths_dequantize(kernel_calls):
    m32 = packed(dtype=torch.float32)
    m32(torch.randn(1, 128))
    m3 = packed(bits=3, dtype=torch.bfloat16)
    m3(torch.randn(1, 128).bfloat16())
    assert kernel_calls == [] and not m32.greenopt_fast_kernel and not m3.greenopt_fast_kernel


def test_without_the_kernel_nothing_claims_a_fast_path(monkeypatch):
    monkeypatch.setattr(qp, "_INT4_CPU", False)
    m = packed()
    y = m(torch.randn(1, 128).bfloat16())
    assert y.dtype == torch.bfloat16 and not m.greenopt_fast_kernel


@needs_kernel
def test_a_bf16_model_quantized_to_4_bits_reports_the_fast_kernel():
    tok = tiny_tokenizer()
    step = QuantizeStep(method="rtn", bits=4, group_size=32)
    bf16 = tiny_llama().to(torch.bfloat16)
    assert apply(bf16, Variant(steps=(step,)), tokenizer=tok).fast_kernel
    fp32 = tiny_llama()
    assert not apply(fp32, Variant(steps=(step,)), tokenizer=tok).fast_kernel
    ids = torch.randint(3, 200, (1, 8))
    with torch.inference_mode():  # the fused model agrees with the same codes dequantized in fp32
        a, b = bf16(ids).logits.float(), fp32(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_the_compute_dtype_survives_an_export_round_trip(tmp_path):
    from greenopt.ship import export, load

    variant = Variant(steps=(QuantizeStep(method="rtn", bits=4, group_size=32),), deploy=Deploy(dtype="bfloat16"))
    model, tok = cast(tiny_llama(), variant.deploy), tiny_tokenizer()
    apply(model, variant, tokenizer=tok)
    export(model, tok, variant, None, tmp_path / "out")
    back = load(tmp_path / "out")
    layers = [m for m in back.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    ids = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, model(ids).logits)
