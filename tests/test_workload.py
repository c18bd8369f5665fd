"""The GO-1 workload on tiny models with fake and replayed meters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from greenopt.config import protocol_preset
from greenopt.errors import ConfigError, MeterError
from greenopt.measure import workload
from greenopt.measure.workload import compare, load_prompts, measure
from greenopt.records import WindowResult
from greenopt.testing import FakeMeter, ReplayMeter, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class Recorded:
    """Wraps a model; logs (name, new tokens) for every generate call into a shared list."""

    def __init__(self, model, name: str, log: list) -> None:
        self._model, self._name, self._log = model, name, log

    def generate(self, **kw):
        out = self._model.generate(**kw)
        self._log.append((self._name, int(out.shape[0] * (out.shape[1] - kw["input_ids"].shape[1]))))
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


class AttributingReplay(ReplayMeter):
    """A ReplayMeter that also notes which models generated inside each window."""

    def __init__(self, energies_j, calls: list, tier="M1") -> None:
        super().__init__(energies_j, tier)
        self.calls, self.ran = calls, []

    def _start(self):
        return len(self.calls)

    def _stop(self, token, duration_s):
        self.ran.append({name for name, _ in self.calls[token:]})
        return super()._stop(None, duration_s)


# ---------------------------------------------------------------------------- prompts


def test_prompts_file_is_real_text():
    rows = [json.loads(line) for line in workload.PROMPTS_PATH.read_text().splitlines()]
    assert len(rows) == 16
    assert all(len(r["text"].split()) >= 300 and r["source"].startswith("gensim") for r in rows)
    assert workload.PROMPTS_PATH.stat().st_size < 200_000


def test_load_prompts_exact_length(tok):
    ids = load_prompts(tok, protocol_preset("smoke"))
    assert ids.dtype == torch.long and ids.shape == (16, 8)
    long = load_prompts(tok, protocol_preset("smoke", prompt_tokens=256))
    assert long.shape == (16, 256)
    assert torch.equal(long[:, :8], ids)  # same text, just truncated later


def test_load_prompts_concatenates_short_texts(tok):
    longest = max(len(tok(t)["input_ids"]) for t in workload.prompt_texts())
    ids = load_prompts(tok, protocol_preset("smoke", prompt_tokens=longest + 50))
    assert ids.shape == (16, longest + 50)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        load_prompts(tok, protocol_preset("smoke", prompt_tokens=10**7))


@pytest.mark.parametrize("field,value", [("new_tokens", 0), ("trials", 0), ("batch_size", 0),
                                         ("prompt_tokens", 0), ("cv_max", 0.0), ("trial_min_s", -1.0)])
def test_invalid_protocol_values_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        protocol_preset("smoke", **{field: value})


# ---------------------------------------------------------------------------- measure


def test_measure_counts_tokens_exactly(model, tok):
    calls: list = []
    proto = protocol_preset("smoke", trial_min_tokens=10, batch_size=2)  # 2 calls of 2x4 tokens
    m = measure(Recorded(model, "A", calls), tok, proto, FakeMeter(power_w=50.0))
    assert len(m.trials) == 5
    for t in m.trials:
        assert (t.generated_tokens, t.prompt_tokens) == (16, 2 * 2 * 8)
        assert t.energy_j == pytest.approx(50.0 * t.duration_s)
        assert t.joules_per_token == pytest.approx(50.0 * t.duration_s / 16)
    # warm-up 1 call, trials 5 x 2 calls of 2 rows x exactly 4 new tokens; prefill 2 calls x 2 rows x 1
    assert [n for _, n in calls] == [8] * 11 + [2] * 2
    jpt = sorted(t.joules_per_token for t in m.trials)
    assert m.joules_per_token == pytest.approx(jpt[2])
    assert m.joules_per_token_ci[0] <= m.joules_per_token <= m.joules_per_token_ci[1]
    assert m.mean_power_w == pytest.approx(50.0) and m.idle_power_w == pytest.approx(50.0)
    assert m.tokens_per_s == pytest.approx(80 / sum(t.duration_s for t in m.trials))
    assert m.protocol_id == "GO-1/b2/p8-n4" and m.source_tier == "M1"


def test_measure_replayed_figures_exact(model, tok):
    # windows: idle, 5 trials (1 call of 4 tokens each), prefill (1 call)
    meter = ReplayMeter([0.5, 4.0, 4.0, 4.04, 3.96, 4.0, 2.0])
    m = measure(model, tok, protocol_preset("smoke"), meter)
    assert m.joules_per_token == pytest.approx(1.0)
    assert m.prefill_joules_per_prompt_token == pytest.approx(2.0 / 8)
    assert m.decode_joules_per_token == pytest.approx((4.0 - 2.0) / 3)
    assert m.cv == pytest.approx(math.sqrt(0.0002 / 4))  # J/token 1, 1, 1.01, 0.99, 1: sd / mean
    assert (m.tier, m.flags, m.valid) == ("M1", (), True)


def test_high_cv_downgrades_once(model, tok):
    meter = ReplayMeter([0.5, 4.0, 4.4, 3.6, 4.0, 4.0, 2.0])
    m = measure(model, tok, protocol_preset("smoke"), meter)
    assert m.cv > 0.05
    assert (m.flags, m.source_tier, m.tier) == (("high-cv",), "M1", "M2")


class FlaggingMeter(FakeMeter):
    def __init__(self, flags, tier="M1", foreign=None):
        super().__init__(power_w=10.0, tier=tier)
        self.flags, self.foreign = flags, foreign

    def _stop(self, token, duration_s):
        r = super()._stop(token, duration_s)
        return WindowResult(energy_j=r.energy_j, duration_s=r.duration_s, tier=r.tier, flags=self.flags)

    def __getattr__(self, name):
        if name == "foreign_gpu_processes" and self.foreign is not None:
            return lambda: self.foreign
        raise AttributeError(name)


def test_window_flags_and_few_trials_downgrade_once(model, tok):
    m = measure(model, tok, protocol_preset("smoke", trials=3), FlaggingMeter(("counter-not-monotonic",)))
    assert "counter-not-monotonic" in m.flags and "few-trials" in m.flags
    assert (m.source_tier, m.tier) == ("M1", "M2")  # one step, however many checks failed
    e1 = measure(model, tok, protocol_preset("smoke"), FlaggingMeter(("short-window",), tier="E1"))
    assert (e1.tier, e1.flags[0]) == ("E1", "short-window")


def test_foreign_gpu_processes_flagged(model, tok):
    m = measure(model, tok, protocol_preset("smoke"), FlaggingMeter((), foreign=(4242,)))
    assert "foreign-gpu-processes" in m.flags and m.tier == "M2"
    ok = measure(model, tok, protocol_preset("smoke"), FlaggingMeter((), foreign=()))
    assert "foreign-gpu-processes" not in ok.flags


def test_measure_leaves_model_unchanged(tok):
    model = tiny_llama(seed=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen_before = model.generation_config.to_dict()
    stages = []
    measure(model, tok, protocol_preset("smoke"), FakeMeter(), progress=lambda s, d, t: stages.append((s, d, t)))
    assert model.training
    assert gen_before == model.generation_config.to_dict()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert stages[0] == ("idle", 1, 1) and ("trials", 5, 5) in stages and stages[-1] == ("prefill", 1, 1)


# ---------------------------------------------------------------------------- compare


def _compare_replayed(model, tok, seed: int):
    calls: list = []
    first, second = [4.0] * 5, [2.0] * 5
    trials = [e for pair in zip(first, second) for e in pair]
    meter = AttributingReplay([1.0, *trials, 2.0, 1.0], calls)
    cmp = compare(Recorded(model, "A", calls), Recorded(tiny_llama(seed=1, layers=2), "B", calls),
                  tok, protocol_preset("smoke"), meter, order_seed=seed)
    return cmp, meter.ran


def test_compare_alternates_and_gives_exact_eei(model, tok):
    cmp, ran = _compare_replayed(model, tok, seed=0)
    assert ran[0] == set()  # idle window
    sides = [next(iter(r)) for r in ran[1:11]]
    assert all(len(r) == 1 for r in ran[1:])
    assert sides == [sides[0], sides[1]] * 5 and sides[0] != sides[1]  # A B A B or B A B A
    assert [next(iter(r)) for r in ran[11:]] == sides[:2]  # prefill windows, same order
    expected = 50.0 if sides[0] == "A" else 200.0  # first side's trials got 4 J, second's 2 J
    assert cmp.eei == pytest.approx(expected)
    assert cmp.eei_ci == pytest.approx((expected, expected))
    assert cmp.baseline.protocol_id == cmp.candidate.protocol_id
    assert cmp.tier == "M1"


def test_compare_start_order_follows_the_order_seed(model, tok):
    ran0 = _compare_replayed(model, tok, 0)[1]
    assert _compare_replayed(model, tok, 0)[1] == ran0  # same seed, same order
    firsts = {next(iter(ran0[1]))}
    for seed in range(1, 8):
        firsts.add(next(iter(_compare_replayed(model, tok, seed)[1][1])))
        if len(firsts) == 2:
            break
    assert firsts == {"A", "B"}


def test_compare_with_itself_gives_100(model, tok):
    meter = FakeMeter(energy_fn=lambda duration_s: 2.0)  # same energy per window: EEI is exactly 100
    cmp = compare(model, model, tok, protocol_preset("smoke", batch_size=2), meter)
    assert cmp.eei == pytest.approx(100.0) and cmp.eei_ci == pytest.approx((100.0, 100.0))
    assert [t.generated_tokens for t in cmp.baseline.trials] == [t.generated_tokens for t in cmp.candidate.trials]
    assert cmp.baseline.joules_per_token == pytest.approx(2.0 / 8)


def test_measuring_checks_the_model_sits_where_the_meter_measures(model, tok):
    class OneGpu(FakeMeter):
        def check_model(self, m):
            raise MeterError("the model is on cpu but the meter measures cuda:0")

    with pytest.raises(MeterError, match="measures cuda:0"):
        measure(model, tok, protocol_preset("smoke"), OneGpu())
