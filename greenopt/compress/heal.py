"""Healing: logit distillation from the model as it was before the variant's first step.

The teacher is the frozen copy that :func:`greenopt.compress.apply` keeps in
``ctx.teacher`` while it applies a variant with a heal step (and frees afterwards). The
student is the model after the steps before heal; with ``mode: full`` every float parameter
it still has is trained with AdamW (no weight decay: it would pull the student away from the
teacher) to minimise ``T^2 * KL(p_teacher,T || p_student,T)`` over every next-token position
of calibration windows (Hinton et al. 2015). The student stays in eval mode while it trains,
so no dropout makes two heals with the same seed differ.

Text: Wikipedia ``calibration`` split only, never evaluation items. Its last eighth of
articles is held out: ``heldout_rows`` windows there measure KL (at temperature 1, the
distributions the model really serves) before and after; training windows are drawn from the
other articles with ``seed``, in a fixed order. Training stops after ``steps`` optimizer steps
or at the first step boundary after ``max_seconds`` of training, whichever comes first, and
the report says which.

With ``mode: lora`` the weights stay frozen while rank-``rank`` adapters ``B @ A`` (A seeded,
B zero, so training starts at the cut model) train on every decoder Linear, added to its output
through a forward hook; after training each product is merged into its weight (``W += B @ A``)
and the hooks are removed, so the result is an ordinary checkpoint with the same shapes, and a
pruned weight's zeros are kept (the merged update is masked). It trains a few percent of the
parameters (the head and embedding not at all) and keeps AdamW's state that small.

Order: heal trains dense float weights, so it comes before any quantize step (heal, then
quantize). Pruned weights stay pruned: when a prune step comes earlier in the variant, every
exact zero of a Linear weight is kept zero by re-applying its mask after every optimizer step;
without one, only Linear weights at least a quarter zero (pruned before this variant) are
masked, because a dense checkpoint holds stray exact zeros too (the default model: 325,128 in
211 matrices) and freezing those would be an arbitrary constraint.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from greenopt import offline
from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import text_windows
from greenopt.compress.q_packed import PackedEmbedding, PackedLinear
from greenopt.compress.targeting import decoder_layers
from greenopt.config import HealStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

_clock = time.perf_counter  # the training budget's clock (tests replace it)
_MICRO_ROWS = 4  # rows per forward/backward; gradients accumulate over a step's rows
_HELDOUT_SHARE = 8  # one calibration article in this many measures KL and never trains
_PRUNED_SHARE = 0.25  # without a prune step in the variant, a weight this much zero was pruned earlier


def check(model: torch.nn.Module, step: HealStep, ctx) -> None:
    """Raises MoveError when heal cannot run: a quantize step or quantized weights before it, or no text."""
    if "quantize" in ctx.earlier:
        raise MoveError("heal: a quantize step comes before it in the variant; heal, then quantize "
                        "(move the heal step before the quantize step)")
    name = _quantized(model)
    if name is not None:
        raise MoveError(f"heal: {name} is already quantized and cannot be trained; heal, then quantize "
                        "(heal the dense model, quantize afterwards)")
    if ctx.tokenizer is None:
        raise MoveError("heal: distillation needs calibration text; pass tokenizer= to apply()")
    if not _trainable(model):
        raise MoveError("heal: the model has no float parameters to train")


def apply(model: torch.nn.Module, step: HealStep, ctx) -> StepReport:
    """Distils the model towards the teacher in ``ctx`` in place, then leaves it in eval mode.

    Args:
        model: the causal LM after the variant's earlier steps, changed in place.
        step: budget (``steps``, ``max_seconds``), ``lr``, rows per step (``batch``),
            ``seq_len``, ``temperature``, ``seed``, ``heldout_rows``.
        ctx: the ApplyContext: tokenizer and ``teacher`` (the model before the first step).

    Returns:
        StepReport: params/bytes (unchanged), tensors trained, and notes with the KL to the
        teacher before and after (nats/token, held-out calibration windows), steps run, the
        stop reason, tokens seen and training seconds.

    Raises:
        MoveError: the checks of :func:`check` fail, or there is no teacher (heal was not
            applied through :func:`greenopt.compress.apply`).
    """
    check(model, step, ctx)
    teacher = ctx.teacher
    if teacher is None:
        raise MoveError("heal: no teacher model; apply heal through greenopt.compress.apply(model, variant), "
                        "which keeps the model as it was before the variant's first step")
    before = snapshot(model)
    train, held = heal_windows(ctx.tokenizer, step)
    zeros = _zero_masks(model, 0.0 if "prune" in ctx.earlier else _PRUNED_SHARE)
    kl_before = mean_kl_nats(teacher, model, held)
    masks = {id(w): z for w, z in zeros}
    adapters = _add_adapters(model, step, masks) if step.mode == "lora" else []
    params = [p for a in adapters for p in (a.a, a.b)] if adapters else _trainable(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        run = _train(model, teacher, train, params, [] if adapters else zeros, step)
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        _merge(adapters, masks)
        model.eval()
    kl_after = mean_kl_nats(teacher, model, held)
    steps_run = run[0]
    log.info("heal: KL %.4f -> %.4f nats/token after %d steps (%s)", kl_before, kl_after, steps_run, run[3])
    notes = _notes(step, (kl_before, kl_after), run, held, params, zeros, adapters)
    if adapters:
        owners = {id(a.module) for a in adapters}
    else:
        trained = {id(p) for p in params}
        owners = {id(m) for m in model.modules() for p in m.parameters(recurse=False) if id(p) in trained}
    summary = f"healed by distillation: KL {kl_before:.4f} -> {kl_after:.4f} nats/token in {steps_run} steps"
    return step_report("heal", summary, model, before, len(owners), notes=notes)


def heal_windows(tokenizer, step: HealStep) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(training windows ``[steps * batch, seq_len]``, held-out windows ``[heldout_rows, seq_len]``).

    Both come from the Wikipedia calibration split, from disjoint articles: the held-out ones
    from its last eighth (evenly spread), the training ones from the rest (drawn with ``seed``).

    Raises:
        MoveError: the split is too short for the windows.
    """
    articles = offline.wiki_split("calibration")
    if len(articles) < 2:
        raise MoveError("heal: the calibration split has fewer than 2 articles; cannot hold any out")
    k = max(1, len(articles) // _HELDOUT_SHARE)
    train = text_windows(tokenizer, articles[:-k], step.steps * step.batch, step.seq_len, seed=step.seed)
    held = text_windows(tokenizer, articles[-k:], step.heldout_rows, step.seq_len, seed=None)
    return train, held


@torch.no_grad()
def mean_kl_nats(teacher: torch.nn.Module, student: torch.nn.Module, windows: torch.LongTensor,
                 temperature: float = 1.0) -> float:
    """Mean ``KL(teacher || student)`` over every next-token position of ``windows``, in nats/token.

    Args:
        teacher: the reference causal LM.
        student: the model compared with it (same vocabulary).
        windows: token ids ``[rows, seq_len]``.
        temperature: both distributions are ``softmax(logits / temperature)``.

    Returns:
        The token-weighted mean KL divergence.
    """
    total = 0.0
    for chunk in windows.split(_MICRO_ROWS):
        total += float(_kl(_logits(student, chunk), _logits(teacher, chunk), temperature)) * chunk.numel()
    return total / windows.numel()


def _train(model, teacher, windows, params, zeros, step: HealStep) -> tuple[int, int, float, str]:
    opt = torch.optim.AdamW(params, lr=step.lr, weight_decay=0.0)
    start, steps_run, tokens, reason = _clock(), 0, 0, "steps"
    for i in range(step.steps):
        rows = windows[i * step.batch:(i + 1) * step.batch]
        opt.zero_grad(set_to_none=True)
        for chunk in rows.split(_MICRO_ROWS):
            with torch.no_grad():
                target = _logits(teacher, chunk)
            loss = _kl(_logits(model, chunk), target, step.temperature) * step.temperature ** 2
            (loss * (chunk.numel() / rows.numel())).backward()
            loss = loss.detach()
        opt.step()
        with torch.no_grad():
            for w, zero in zeros:
                w.masked_fill_(zero, 0)
        steps_run, tokens = steps_run + 1, tokens + rows.numel()
        if i % 10 == 0:
            log.info("heal: step %d/%d, loss %.4f", i + 1, step.steps, loss.item())
        if steps_run < step.steps and _clock() - start >= step.max_seconds:
            reason = "max_seconds"
            break
    seconds = _clock() - start
    opt.zero_grad(set_to_none=True)
    del opt
    return steps_run, tokens, seconds, reason


def _notes(step: HealStep, kl: tuple[float, float], run: tuple[int, int, float, str], held, params,
           zeros, adapters=()) -> tuple[str, ...]:
    steps_run, tokens, seconds, reason = run
    clock = f" (max_seconds={step.max_seconds:g})" if reason == "max_seconds" else ""
    what = (f"rank-{step.rank} adapters on {len(adapters)} decoder Linears, merged into their weights"
            if adapters else f"{len(params)} float tensors")
    notes = [(f"KL to the teacher {kl[0]:.4f} -> {kl[1]:.4f} nats/token (temperature 1, "
              f"{held.numel()} tokens in {held.shape[0]} held-out calibration windows)"),
             f"{steps_run} of {step.steps} steps run; stopped by {reason}{clock}",
             f"{tokens} training tokens seen in {seconds:.1f} s of training",
             (f"trained {what} ({sum(p.numel() for p in params)} parameters), AdamW lr "
              f"{step.lr:g}, temperature {step.temperature:g}")]
    if zeros:
        notes.append(f"kept {sum(int(z.sum()) for _, z in zeros)} zero weights in {len(zeros)} modules zero")
    if reason == "max_seconds":
        notes.append("stopped by the clock: re-applying this variant may run a different number of steps")
    return tuple(notes)


class _Adapter:
    """One Linear's LoRA pair (float32, on its device) and the hook that adds ``x @ (B @ A).T``
    (the product masked to the weight's nonzeros when it is pruned, as it will be merged)."""

    def __init__(self, module: torch.nn.Linear, rank: int, generator: torch.Generator,
                 zero: torch.Tensor | None) -> None:
        self.module = module
        w = module.weight
        a = torch.empty(rank, module.in_features)
        torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=generator)  # as nn.Linear (and peft) do
        self.a = torch.nn.Parameter(a.to(w.device))
        self.b = torch.nn.Parameter(torch.zeros(module.out_features, rank, device=w.device))
        self.keep = None if zero is None else (~zero).float()
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        x = args[0].float()
        if self.keep is None:
            return out + F.linear(F.linear(x, self.a), self.b).to(out.dtype)
        return out + F.linear(x, (self.b @ self.a) * self.keep).to(out.dtype)


def _add_adapters(model: torch.nn.Module, step: HealStep, zeros: dict[int, torch.Tensor]) -> list[_Adapter]:
    layers = decoder_layers(model)
    generator = torch.Generator().manual_seed(step.seed)
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear) and type(m.weight) is torch.nn.Parameter]
    if not linears:
        raise MoveError("heal: mode lora found no Linear in the decoder layers; use mode: full")
    return [_Adapter(m, min(step.rank, m.in_features, m.out_features), generator, zeros.get(id(m.weight)))
            for m in linears]


@torch.no_grad()
def _merge(adapters: list[_Adapter], zeros: dict[int, torch.Tensor]) -> None:
    """Adds each adapter's ``B @ A`` into its weight (masked where the weight is pruned) and unhooks it."""
    for ad in adapters:
        ad.handle.remove()
        w = ad.module.weight
        delta = (ad.b @ ad.a).to(w.dtype)
        zero = zeros.get(id(w))
        if zero is not None:
            delta.masked_fill_(zero, 0)
        w.add_(delta)


def _logits(model: torch.nn.Module, ids: torch.LongTensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device), use_cache=False).logits.float()


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if type(p) is torch.nn.Parameter and p.is_floating_point()]


def _quantized(model: torch.nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, PackedEmbedding)):
            return name
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and (type(w) is not torch.nn.Parameter or not w.is_floating_point()):
            return name
    return None


def _zero_masks(model: torch.nn.Module, min_share: float) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    seen, out = set(), []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and type(w) is torch.nn.Parameter and id(w) not in seen:
            seen.add(id(w))
            zero = w.detach() == 0
            if zero.any() and float(zero.float().mean()) >= min_share:
                out.append((w, zero))
    return out
