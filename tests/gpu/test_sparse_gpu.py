"""2:4 semi-structured sparse kernels on CUDA (torch.sparse.to_sparse_semi_structured)."""

import pytest
import torch

from greenopt.compress import accounting, apply
from greenopt.compress.prune import SemiSparseLinear, _mask
from greenopt.config import PruneStep, Variant
from greenopt.testing import tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _masked_linear(out_f=256, in_f=512, dtype=torch.float16):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=True).to("cuda", dtype).eval()
    with torch.no_grad():
        lin.weight.mul_(_mask(lin.weight.abs().float(), "2:4", 0.5, per_row=True).to(dtype))
    return lin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_sparse_linear_matches_masked_dense(dtype, rows):
    lin = _masked_linear(dtype=dtype)
    sparse = SemiSparseLinear(lin)
    x = torch.randn(rows, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref, got = lin(x).float(), sparse(x).float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    assert sparse.greenopt_flops_per_token() == 256 * 512 // 2
    assert sparse.greenopt_bits < 16


def test_sparse_linear_state_dict_is_dense_and_round_trips():
    lin = _masked_linear()
    sparse = SemiSparseLinear(lin)
    sd = sparse.state_dict()
    assert set(sd) == {"weight", "bias"}
    assert torch.equal(sd["weight"], lin.weight.detach())
    other = SemiSparseLinear(_masked_linear())
    other.load_state_dict(sd)
    x = torch.randn(3, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert torch.allclose(other(x), sparse(x), atol=1e-3)


def test_prune_step_converts_tiny_llama():
    model = tiny_llama().to("cuda", torch.float16)
    ids = torch.randint(1, 300, (1, 12), device="cuda")
    report = apply(model, Variant(steps=[PruneStep(method="magnitude", pattern="2:4")]))
    step = report.steps[0]
    assert step.fast_kernel is True, step.notes
    assert accounting.fast_kernel(model) is True
    assert report.flops_per_token_after < report.flops_per_token_before
    # reference: the same masked weights as an ordinary dense model
    dense = tiny_llama().to("cuda", torch.float16)
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        out, ref = model(ids).logits.float(), dense(ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == 16
