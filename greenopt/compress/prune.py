"""Weight pruning: unstructured magnitude or Wanda at any sparsity, and 2:4 semi-structured.

Scores:

- ``magnitude``: ``|W_ij|``, compared over the whole matrix (the usual layer-wise baseline).
- ``wanda``: ``|W_ij| * ||X_j||`` (Sun et al. 2023), compared within each output row, with
  ``||X_j||`` the L2 norm of input feature j over the calibration sample. The norms come from
  one pass of the sample through the model as it was before this step (the paper feeds each
  layer the output of the already-pruned layers before it; one pass is cheaper and close).
- ``2:4``: in every group of 4 consecutive input weights of a row keep the 2 best by the
  method's score (50% sparsity by definition).

Energy (shared/ENERGY.md §1): zeros stored in a dense matrix move the same bytes and run the
same FLOPs, so unstructured pruning gains nothing on dense kernels and says so. 2:4 on CUDA
with fp16/bf16 weights converts each pruned Linear to torch's semi-structured sparse format
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt or CUTLASS), so the matmul really runs
sparse; a module whose conversion or self-check fails stays dense (mask only) with a note.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import input_feature_norms
from greenopt.compress.targeting import select, set_module
from greenopt.config import PruneStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

_SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def check(model: torch.nn.Module, step: PruneStep, ctx) -> None:
    """Raises MoveError when the step cannot apply (nothing matched, quantized weights, bad 2:4 shape)."""
    mods = select(model, step.target, what="prune")
    if step.method == "wanda" and ctx.tokenizer is None:
        raise MoveError("prune method 'wanda' needs calibration activations; pass tokenizer= to apply()")
    if step.pattern == "2:4" and step.sparsity != 0.5:
        raise MoveError(f"prune pattern '2:4' is 50% sparsity by definition; got sparsity={step.sparsity}, "
                        "set sparsity: 0.5 or use pattern 'unstructured'")
    for name, m in mods:
        if type(m.weight) is not torch.nn.Parameter or not m.weight.is_floating_point():
            raise MoveError(f"prune: {name} holds a {type(m.weight).__name__} {m.weight.dtype} weight "
                            "(quantized or already sparse); put prune before quantize in the variant")
        if step.pattern == "2:4" and m.in_features % 4:
            raise MoveError(f"prune 2:4: {name} has in_features={m.in_features}, not a multiple of 4; "
                            "exclude it from the target")


def apply(model: torch.nn.Module, step: PruneStep, ctx) -> StepReport:
    """Zeros the lowest-scored weights of every targeted Linear; on CUDA converts 2:4 to sparse kernels.

    Args:
        model: the causal LM, changed in place.
        step: method, pattern, sparsity (fraction of weights zeroed) and target.
        ctx: the ApplyContext (calibration sample for Wanda).

    Returns:
        StepReport: bytes before/after, modules pruned, fast_kernel (True only when every
        pruned module runs a 2:4 sparse kernel), notes on what the zeros buy.
    """
    before = snapshot(model)
    mods = select(model, step.target, what="prune")
    norms = input_feature_norms(model, dict(mods), ctx.calibration()) if step.method == "wanda" else {}
    zeros = total = 0
    with torch.no_grad():
        for name, m in mods:
            w = m.weight.data
            score = w.abs().float()
            if step.method == "wanda":
                score.mul_(norms[name].to(score.device)[None, :])
            keep = _mask(score, step.pattern, step.sparsity, per_row=step.method == "wanda")
            w.mul_(keep.to(w.dtype))
            zeros += int((w == 0).sum())
            total += w.numel()
    notes: list[str] = []
    fast: bool = False
    if step.pattern == "2:4":
        converted, failures = _to_sparse_kernels(model, mods)
        fast = converted == len(mods)
        notes.append(f"{converted}/{len(mods)} modules run torch semi-structured 2:4 sparse kernels")
        notes.extend(failures[:5])
        if len(failures) > 5:
            notes.append(f"... and {len(failures) - 5} more modules stay dense")
    else:
        notes.append("unstructured zeros stored dense: dense kernels move the same bytes and run the same "
                     "FLOPs, so no speed-up or energy saving is expected")
    tied = _tied_output(model)
    if any(m is tied for _, m in mods):
        notes.append("the output projection is tied to the input embedding: its zeros apply to both")
    summary = (f"{step.method} {step.pattern} pruning of {len(mods)} Linear modules: "
               f"{zeros / max(total, 1):.3f} of their weights are zero")
    return step_report("prune", summary, model, before, len(mods), fast_kernel=fast, notes=tuple(notes))


def _mask(score: torch.Tensor, pattern: str, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask: True where the weight survives; exactly round(sparsity x group) zeros per group."""
    out_f, in_f = score.shape
    if pattern == "2:4":
        groups = score.reshape(out_f, in_f // 4, 4)
        top = groups.topk(2, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(out_f, in_f)
    flat = score if per_row else score.reshape(1, -1)
    k = int(round(sparsity * flat.shape[1]))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(out_f, in_f)


def _to_sparse_kernels(model: torch.nn.Module, mods) -> tuple[int, list[str]]:
    """Swaps 2:4-masked CUDA fp16/bf16 Linears for SemiSparseLinear; returns (count, notes)."""
    converted, notes = 0, []
    tied = _tied_output(model)
    for name, m in mods:
        w = m.weight
        if not w.is_cuda:
            if not notes:
                notes.append("zeros stored dense; no CPU sparse kernel: no speed-up expected")
            continue
        if w.dtype not in _SPARSE_DTYPES:
            notes.append(f"{name}: {w.dtype} weight; torch 2:4 kernels need fp16/bf16, stays dense")
            continue
        if m is tied:
            notes.append(f"{name}: weight tied to the input embedding; stays dense to keep the tie")
            continue
        try:
            new = SemiSparseLinear(m)
            _self_check(m, new)
        except Exception as e:  # noqa: BLE001 - any kernel or shape failure means: stay dense
            notes.append(f"{name}: sparse kernel unavailable ({type(e).__name__}: {str(e)[:100]}); stays dense")
            log.info("2:4 kernel not used for %s: %s", name, e)
            continue
        set_module(model, name, new)
        converted += 1
    return converted, notes


def _tied_output(model: torch.nn.Module) -> torch.nn.Module | None:
    cfg = getattr(model, "config", None)
    get = getattr(model, "get_output_embeddings", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False) and callable(get):
        return get()
    return None


@torch.no_grad()
def _self_check(dense: torch.nn.Linear, sparse: "SemiSparseLinear") -> None:
    g = torch.Generator(device=dense.weight.device).manual_seed(0)
    x = torch.randn(8, dense.in_features, device=dense.weight.device, dtype=dense.weight.dtype, generator=g)
    ref = F.linear(x, dense.weight, dense.bias).float()
    err = (sparse(x).float() - ref).norm() / ref.norm().clamp_min(1e-6)
    if not torch.isfinite(err) or err > 1e-2:
        raise RuntimeError(f"sparse output differs from the masked dense one (relative error {float(err):.3g})")


class SemiSparseLinear(torch.nn.Module):
    """A 2:4-pruned Linear whose weight is held in torch's semi-structured sparse format (CUDA only).

    The compressed tensors are registered as non-persistent buffers, so ``weight_bytes``
    counts what is really stored. ``state_dict()`` writes the dense (masked) ``weight`` and
    loading one re-compresses it, so checkpoints stay ordinary Linear checkpoints. Moving or
    casting the module decompresses and re-compresses (fp16/bf16 on CUDA only).
    """

    greenopt_fast_kernel = True

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self._names: tuple[str, ...] = ()
        self._set_dense(linear.weight.detach())

    def _set_dense(self, dense: torch.Tensor) -> None:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(dense.contiguous())
        names, self._flat_meta = sparse.__tensor_flatten__()
        for n in self._names:
            delattr(self, f"sparse_{n}")
        self._cls, self._names = type(sparse), tuple(names)
        for n in names:
            self.register_buffer(f"sparse_{n}", getattr(sparse, n), persistent=False)
        self._sparse = sparse

    def sparse_weight(self) -> torch.Tensor:
        """The weight as a SparseSemiStructuredTensor (rebuilt from the buffers when needed)."""
        if self._sparse is None:
            inner = {n: getattr(self, f"sparse_{n}") for n in self._names}
            self._sparse = self._cls.__tensor_unflatten__(inner, self._flat_meta, self._flat_meta[0], None)
        return self._sparse

    def dense_weight(self) -> torch.Tensor:
        """The masked weight as an ordinary dense tensor."""
        return self.sparse_weight().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.contiguous(), self.sparse_weight(), self.bias)

    def greenopt_flops_per_token(self) -> int:
        # Sparse tensor cores skip the zero half of the multiply-adds.
        return self.in_features * self.out_features

    @property
    def greenopt_bits(self) -> float:
        stored = sum(getattr(self, f"sparse_{n}").numel() * getattr(self, f"sparse_{n}").element_size()
                     for n in self._names)
        return 8.0 * stored / (self.in_features * self.out_features)

    def _apply(self, fn, recurse=True):
        dense = fn(self.dense_weight())
        if not dense.is_cuda or dense.dtype not in _SPARSE_DTYPES:
            raise RuntimeError("SemiSparseLinear runs only on CUDA with fp16/bf16 weights; "
                               "move or cast the model before the 2:4 prune step")
        for n in self._names:
            delattr(self, f"sparse_{n}")
        self._names, self._sparse = (), None
        super()._apply(fn, recurse)
        self._set_dense(dense)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight().detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        ref = self.sparse_weight()
        self._set_dense(state_dict[key].to(device=ref.device, dtype=ref.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse"
