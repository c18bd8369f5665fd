"""Quantized modules on CUDA: forward matches CPU, whether quantized on CPU and moved, or on CUDA."""

import pytest
import torch

from greenopt.compress import ApplyContext, apply
from greenopt.config import QuantizeStep, Target, Variant
from greenopt.testing import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
# (method, bits, group, min dB moved from cpu, min dB quantized on cuda). Quantizing on CUDA
# may flip a few codes (HQQ optimizes in fp16 there; GPTQ's Cholesky differs slightly).
CASES = [("rtn", 4, 32, 40, 35), ("rtn", 2, 16, 40, 35), ("hqq", 4, 32, 30, 15), ("gptq", 4, 32, 30, 15),
         ("bnb_int8", 8, None, 25, 25), ("bnb_nf4", 4, 64, 30, 30), ("torchao_int8", 8, None, 30, 30)]


class Ctx(ApplyContext):
    def calibration(self):
        return torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(2))


def _logits(m, device):
    with torch.no_grad():
        return m(IDS.to(device)).logits.float().cpu()


def _sqnr_db(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _step(method, bits, group):
    return Variant(steps=[QuantizeStep(method=method, bits=bits, group_size=group,
                                       target=Target(include=("*", "lm_head")))])


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("method,bits,group,min_db,_", CASES)
def test_quantized_on_cpu_then_moved_matches_cpu(method, bits, group, min_db, _):
    m = tiny_llama(layers=2, hidden=128, intermediate=256)
    apply(m, _step(method, bits, group), ctx=Ctx(tokenizer=object()))
    on_cpu = _logits(m, "cpu")
    m.to("cuda")
    assert _sqnr_db(on_cpu, _logits(m, "cuda")) > min_db


@pytest.mark.parametrize("method,bits,group,_,min_db", CASES)
def test_quantized_on_cuda_matches_cpu(method, bits, group, _, min_db):
    cpu, gpu = tiny_llama(layers=2, hidden=128, intermediate=256), tiny_llama(layers=2, hidden=128, intermediate=256)
    apply(cpu, _step(method, bits, group), ctx=Ctx(tokenizer=object()))
    gpu.to("cuda")
    report = apply(gpu, _step(method, bits, group), ctx=Ctx(tokenizer=object()))
    assert _sqnr_db(_logits(cpu, "cpu"), _logits(gpu, "cuda")) > min_db
    if method.startswith("bnb_"):
        assert report.fast_kernel is True
    elif method in ("rtn", "hqq", "gptq"):
        assert report.fast_kernel is False
