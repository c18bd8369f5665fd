"""The KL fidelity look, and paired accuracy differences.

The cheap first rung of a search: how far a variant's next-token distribution moved from the
baseline's, on fixed windows of held-aside Wikipedia text (the ``perplexity`` split, disjoint
from calibration text, workload prompts and evaluation items).

The baseline is scored once into a :class:`BaselineReference`: at every position its ``top_k``
most likely token ids, their log-probabilities, and the log of the mass left over (fp32).
:func:`kl_look` then needs one forward pass of the candidate: it reads the candidate's
log-probabilities of those same ids, pools the rest of its mass into one remainder bucket, and
averages KL(baseline || candidate) over positions on that coarsened (k+1)-outcome distribution.
Coarsening is a function of the outcome, so by the data processing inequality the result is a
lower bound of the full-vocabulary KL; it is close to it when the top-k hold most of the mass.

A reference is cached per (baseline weights fingerprint, token ids, k, runtime, device) in
memory and on disk under ``$GREENOPT_HOME/cache/fidelity/<key>.safetensors``.

Example:
    >>> from greenopt.config import KLSpec
    >>> from greenopt.evaluate.fidelity import baseline_reference, kl_look
    >>> from greenopt.testing import tiny_llama, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ref = baseline_reference(tiny_llama(), tok, KLSpec(windows=2, tokens=16, top_k=8))
    >>> kl_look(tiny_llama(), ref, tok).kl_nats_per_token < 1e-6
    True
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from greenopt import offline
from greenopt._io import write_bytes
from greenopt.compress.calibration import text_windows
from greenopt.config import KLSpec
from greenopt.errors import ConfigError
from greenopt.evaluate.lean_lm import CHUNK_FLOATS, logprob_chunks
from greenopt.records import KLLook, PairedDifference
from greenopt.runtimes import Runtime, as_runtime

log = logging.getLogger(__name__)

_FORMAT = 1
_CHUNK_FLOATS = CHUNK_FLOATS  # full-vocab floats per log-softmax chunk (128 MiB of fp32)
_SAMPLE = 4096  # strided values per tensor hashed exactly by the fingerprint
_MEMORY: collections.OrderedDict[str, BaselineReference] = collections.OrderedDict()
_MEMORY_MAX = 4


@dataclass(frozen=True, eq=False)
class BaselineReference:
    """The baseline's coarsened next-token distributions on fixed windows (CPU tensors).

    Attributes:
        key: the cache key (weights fingerprint, token ids, k, runtime and device).
        input_ids: ``[windows, tokens]`` int64, the scored text.
        top_ids: ``[windows, tokens, k]`` int64, the baseline's k most likely next tokens.
        top_logp: ``[windows, tokens, k]`` float32, their log-probabilities (nats).
        rest_logp: ``[windows, tokens]`` float32, log of the mass of every other token
            (``-inf`` when k is the whole vocabulary).
        vocab: the vocabulary size the logits had.
    """

    key: str
    input_ids: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor
    vocab: int

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[-1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "top_ids": self.top_ids, "top_logp": self.top_logp,
                "rest_logp": self.rest_logp}


def cache_dir() -> Path:
    """Where references are kept on disk: ``$GREENOPT_HOME/cache/fidelity``."""
    return offline.home() / "cache" / "fidelity"


def clear_memory_cache() -> None:
    """Forgets the references held in memory (the disk copies stay)."""
    _MEMORY.clear()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest that changes when the config or any weight changes (hex, 64 characters).

    Hashes the config (as JSON, with the attention implementation) and, for every parameter
    and buffer: its name, shape and dtype, its float64 sum and sum of absolute values, and
    ``_SAMPLE`` strided values byte for byte. One changed weight moves the sums; a permutation
    that keeps them is caught by the strided values where it touches them. Reads each tensor
    once (about a second for a 135M-parameter model on CPU), far cheaper than scoring it.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
        h.update(str(getattr(config, "_attn_implementation", None)).encode())
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, t in named:
            flat = t.detach().reshape(-1)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if flat.numel() == 0:
                continue
            sums = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)])
            h.update(sums.cpu().numpy().tobytes())
            sample = flat[:: max(1, flat.numel() // _SAMPLE)].contiguous().cpu()
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def baseline_reference(baseline: Any, tokenizer: Any, spec: KLSpec | None = None, *,
                       directory: Path | None = None) -> BaselineReference:
    """The baseline's reference on ``spec``'s windows: from memory, else disk, else computed.

    Args:
        baseline: the uncompressed model (a transformers model, or a :class:`Runtime` with a
            torch ``module``; the fingerprint needs its weights).
        tokenizer: its tokenizer; builds the windows (BOS first where it puts one before text).
        spec: windows, tokens per window, k and the window seed (default ``KLSpec()``).
        directory: the disk cache (default :func:`cache_dir`).

    Returns:
        The reference, cached under its key.

    Raises:
        ConfigError: ``spec.top_k`` exceeds the vocabulary, or the runtime has no torch module.
        MoveError: the held-aside text is too short for one window.
    """
    spec = spec or KLSpec()
    runtime = as_runtime(baseline, tokenizer)
    if runtime.module is None:
        raise ConfigError(f"the KL reference needs the baseline's weights; {runtime.name} holds none in torch: "
                          "pass the transformers model")
    ids = text_windows(tokenizer, offline.wiki_split("perplexity"), spec.windows, spec.tokens, seed=spec.seed)
    key = reference_key(weights_fingerprint(runtime.module), ids, spec.top_k, runtime)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = (directory or cache_dir()) / f"{key}.safetensors"
    ref = _read(path, key)
    if ref is None:
        t = time.perf_counter()
        ref = _compute_reference(runtime, ids, spec.top_k, key)
        log.info("KL reference %s: %d x %d tokens, top %d, in %.1f s", key, *ids.shape, spec.top_k,
                 time.perf_counter() - t)
        _write(path, ref)
    _MEMORY[key] = ref
    while len(_MEMORY) > _MEMORY_MAX:
        _MEMORY.popitem(last=False)
    return ref


def reference_key(fingerprint: str, input_ids: torch.Tensor, top_k: int, runtime: Runtime) -> str:
    """The cache key of a reference: hex digest of the weights, the token ids, k, runtime and device kind."""
    ids = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    parts = {"format": _FORMAT, "weights": fingerprint, "ids": ids, "shape": list(input_ids.shape),
             "top_k": top_k, "runtime": runtime.name, "device": str(runtime.device).split(":")[0]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def kl_look(candidate: Any, reference: BaselineReference, tokenizer: Any = None) -> KLLook:
    """Mean KL(baseline || candidate) per token on the reference's windows, coarsened to top-k + rest.

    A lower bound of the full-vocabulary KL (data processing inequality), close to it when the
    baseline's top-k hold most of its mass. One forward pass of the candidate, in chunks of
    positions so that at most one chunk's full-vocabulary log-softmax (``_CHUNK_FLOATS`` values)
    exists at a time (:func:`~greenopt.evaluate.lean_lm.logprob_chunks`; a runtime other than
    transformers is asked for whole rows, at least one). A position whose
    candidate log-probabilities are not numbers (NaN) counts as infinitely far: the look is
    then ``inf``, never a finite number averaged over the rest.

    Args:
        candidate: the variant: a :class:`Runtime`, or a transformers model (then ``tokenizer``
            is needed to wrap it).
        reference: the baseline's reference (:func:`baseline_reference`).
        tokenizer: the tokenizer, when ``candidate`` is a model.

    Returns:
        The look: mean KL in nats per token, the worst window's mean, the 99th percentile over
        positions, what was scored and how long it took.

    Raises:
        ConfigError: a bare model without a tokenizer, or a vocabulary other than the reference's.
    """
    if not isinstance(candidate, Runtime) and tokenizer is None:
        raise ConfigError("kl_look: pass the tokenizer with a transformers model (or pass a Runtime)")
    runtime = as_runtime(candidate, tokenizer)
    t = time.perf_counter()
    k = reference.top_k
    top_ids, top_logp = reference.top_ids.reshape(-1, k), reference.top_logp.reshape(-1, k)
    rest_logp = reference.rest_logp.reshape(-1)
    parts = []
    for span, logp in logprob_chunks(runtime, reference.input_ids, _CHUNK_FLOATS):
        if logp.shape[-1] != reference.vocab:
            raise ConfigError(f"the candidate's vocabulary ({logp.shape[-1]}) differs from the baseline's "
                              f"({reference.vocab}); score variants of the same model")
        idx = top_ids[span]
        q_top = logp.gather(-1, idx)  # before _rest_logp overwrites those entries
        parts.append(coarse_kl(top_logp[span], rest_logp[span], q_top, _rest_logp(logp, idx)))
        del logp
    kl = torch.cat(parts).view(reference.input_ids.shape)  # [windows, tokens] float64
    if kl.isnan().any():
        log.warning("KL look: the candidate gave NaN log-probabilities at %d positions", int(kl.isnan().sum()))
        kl = kl.nan_to_num(nan=math.inf)
    ranked = kl.reshape(-1).sort().values
    return KLLook(kl_nats_per_token=float(kl.mean()), window_kl_max_nats_per_token=float(kl.mean(1).max()),
                  position_kl_p99_nats=float(ranked[math.ceil(0.99 * ranked.numel()) - 1]),
                  tokens=kl.numel(), windows=kl.shape[0], top_k=reference.top_k,
                  duration_s=time.perf_counter() - t, reference_key=reference.key)


def coarse_kl(p_top_logp: torch.Tensor, p_rest_logp: torch.Tensor, q_top_logp: torch.Tensor,
              q_rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats per position over k named outcomes plus one remainder, in float64.

    Args:
        p_top_logp: ``[..., k]`` log-probabilities of the named outcomes under P.
        p_rest_logp: ``[...]`` log of P's remaining mass (``-inf``: none).
        q_top_logp: ``[..., k]`` the same outcomes under Q.
        q_rest_logp: ``[...]`` log of Q's remaining mass.

    Returns:
        ``[...]`` float64; a term whose P mass is 0 contributes 0, one where Q's is 0 but P's is
        not contributes ``inf``.
    """
    p_top, q_top = p_top_logp.double(), q_top_logp.double()
    p_rest, q_rest = p_rest_logp.double(), q_rest_logp.double()
    top = torch.where(p_top > -math.inf, p_top.exp() * (p_top - q_top), 0.0).sum(-1)
    rest = torch.where(p_rest > -math.inf, p_rest.exp() * (p_rest - q_rest), 0.0)
    return top + rest


def paired_difference(candidate: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """Mean per-item difference candidate - baseline over the same items, with its paired standard error.

    Scoring both models on the same items removes the items' own spread from the comparison:
    the standard error is sd(d_i) / sqrt(n) over d_i = candidate_i - baseline_i (sample sd),
    usually far below the unpaired sqrt(se_c^2 + se_b^2) because the two are correlated.

    Args:
        candidate: per-item scores (0/1 correctness, or any per-item value), in item order.
        baseline: the baseline's scores on the same items in the same order.

    Returns:
        ``diff`` (mean d_i), ``stderr``, ``z = diff / stderr`` (0 when both are 0, +-inf when only
        the spread is 0) and ``n``.

    Raises:
        ConfigError: the two lists differ in length, or hold fewer than 2 items.
    """
    if len(candidate) != len(baseline):
        raise ConfigError(f"paired_difference: {len(candidate)} candidate items against {len(baseline)} "
                          "baseline items; score both on the same items")
    n = len(candidate)
    if n < 2:
        raise ConfigError(f"paired_difference: {n} item(s); a paired standard error needs at least 2")
    d = [float(c) - float(b) for c, b in zip(candidate, baseline)]
    mean = math.fsum(d) / n
    stderr = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1) / n)
    z = mean / stderr if stderr > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return PairedDifference(diff=mean, stderr=stderr, z=z, n=n)


# ---------------------------------------------------------------------------- internals


def _rest_logp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Log of the mass outside ``idx`` per position; overwrites those entries of ``logp`` with -inf."""
    return logp.scatter_(-1, idx, -math.inf).logsumexp(-1)


def _compute_reference(runtime: Runtime, ids: torch.Tensor, top_k: int, key: str) -> BaselineReference:
    tops, logps, rests, vocab = [], [], [], 0
    for _, logp in logprob_chunks(runtime, ids, _CHUNK_FLOATS):
        vocab = logp.shape[-1]
        if top_k > vocab:
            raise ConfigError(f"KLSpec top_k {top_k} exceeds the vocabulary ({vocab}); use top_k <= {vocab}")
        values, idx = logp.topk(top_k, dim=-1)
        tops.append(idx)
        logps.append(values.float())
        rests.append(_rest_logp(logp, idx).float())
        del logp
    shape = (*ids.shape, top_k)
    return BaselineReference(key=key, input_ids=ids, top_ids=torch.cat(tops).view(shape),
                             top_logp=torch.cat(logps).view(shape), rest_logp=torch.cat(rests).view(ids.shape),
                             vocab=vocab)


def _write(path: Path, ref: BaselineReference) -> None:
    meta = {"format": str(_FORMAT), "key": ref.key, "vocab": str(ref.vocab)}
    write_bytes(path, save({k: v.contiguous() for k, v in ref.tensors().items()}, metadata=meta))


def _read(path: Path, key: str) -> BaselineReference | None:
    """The reference stored at ``path``, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        if meta.get("key") != key or meta.get("format") != str(_FORMAT):
            raise ValueError(f"holds {meta.get('key')!r} format {meta.get('format')!r}")
        return BaselineReference(key=key, vocab=int(meta["vocab"]), **tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # torn or foreign: recompute
        log.warning("KL reference %s is unreadable (%s); recomputing it", path, e)
        return None


# The mapping measured on the default model (docs/FIDELITY.md, 28 variants at 300 items a task):
# mean accuracy drop ~= A + B * log10(KL nats/token), R^2 0.54. A rough ranking, not a predictor.
_DROP_AT_KL1, _DROP_PER_DECADE = 0.080, 0.0475


def kl_cut_for_drop(max_drop: float, margin: float = 2.0) -> float:
    """The KL (nats/token) at which the measured mapping predicts ``margin`` x ``max_drop``.

    A quick look above it is pruned: with the margin, only variants the mapping puts well past
    the accuracy budget are cut (the fit is loose: R^2 0.54).

    Args:
        max_drop: the allowed mean accuracy drop (fraction, 0.05 = 5 points).
        margin: how far past the budget the predicted drop must be.
    """
    return float(10 ** ((margin * max_drop - _DROP_AT_KL1) / _DROP_PER_DECADE))
