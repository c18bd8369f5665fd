"""The CI gate: check_gate on cards built from records (no model), and verify() end to end."""

from __future__ import annotations

import math

import pytest

from greenopt.config import DepthStep, Variant, protocol_preset
from greenopt.label.card import build_card
from greenopt.records import (
    Comparison,
    DeviceInfo,
    EnergyMeasurement,
    EvalResult,
    GateResult,
    TaskScore,
    TrialFigures,
)
from greenopt.ship.gate import VerifySpec, check_gate, task_drop, verify

DEVICE = DeviceInfo(kind="cpu", name="test cpu", meter="fake", boundary="fake meter (tests only)")
RUNTIME = dict(torch="2", transformers="5", attention="sdpa", dtype="float32", batch_size=1,
               prompt_tokens=256, new_tokens=256)


def _measurement(jpt: float, ci: tuple[float, float], tier: str, protocol_id: str, trials: int = 5,
                 flags: tuple[str, ...] = ()) -> EnergyMeasurement:
    figs = tuple(TrialFigures(energy_j=jpt * 64, duration_s=1.0, generated_tokens=64, prompt_tokens=256)
                 for _ in range(trials))
    return EnergyMeasurement(joules_per_token=jpt, joules_per_token_ci=ci, trials=figs, tokens_per_s=64.0,
                             mean_power_w=jpt * 64, cv=0.01, tier=tier, source_tier="M1" if flags else tier,
                             device=DEVICE, protocol_id=protocol_id, flags=flags)


def make_card(eei: float = 45.0, eei_ci: tuple[float, float] = (43.0, 47.0), tier: str = "M1",
              protocol_id: str = "GO-1/b1", tasks: dict[str, tuple[float, float]] | None = None,
              trials: int = 5, flags: tuple[str, ...] = (), perplexity: tuple[float, float] | None = None):
    """A label card from hand-made records. ``tasks``: name -> (variant, baseline) accuracy."""
    tasks = {"arc_easy": (0.60, 0.605), "piqa": (0.64, 0.645)} if tasks is None else tasks
    base = _measurement(1.0, (0.98, 1.02), tier, protocol_id, trials)
    cand = _measurement(eei / 100, (eei_ci[0] / 100, eei_ci[1] / 100), tier, protocol_id, trials, flags)
    cmp = Comparison(eei=eei, eei_ci=eei_ci, baseline=base, candidate=cand)
    scores = [TaskScore(task=t, metric="acc_norm", value=v, n=100) for t, (v, _) in tasks.items()]
    bscores = [TaskScore(task=t, metric="acc_norm", value=b, n=100) for t, (_, b) in tasks.items()]
    if perplexity is not None:
        scores.append(TaskScore(task="wikipedia", metric="word_perplexity", value=perplexity[0], n=10,
                                higher_is_better=False))
        bscores.append(TaskScore(task="wikipedia", metric="word_perplexity", value=perplexity[1], n=10,
                                 higher_is_better=False))
    return build_card(model_id="tiny", variant_name="v", variant_hash="abc", comparison=cmp,
                      candidate_eval=EvalResult(scores=tuple(scores), limit=100, seed=1),
                      baseline_eval=EvalResult(scores=tuple(bscores), limit=100, seed=1), runtime=RUNTIME)


TASKS = ("arc_easy", "piqa")


def gate(card, target="B", max_drop=0.01, tier=None, protocol="GO-1/b1", tasks=TASKS, allow=True) -> GateResult:
    return check_gate(card, target, max_drop, tier, protocol, tasks, allow_estimate=allow)


def test_good_card_passes():
    r = gate(make_card())
    assert r.passed and not r.failures
    assert r.reason.startswith("class B meets target B") and "protocol GO-1/b1" in r.reason
    assert r.task_drops == pytest.approx({"arc_easy": 0.005, "piqa": 0.005})


def test_degraded_class_fails():
    r = gate(make_card(eei=60.0, eei_ci=(58.0, 62.0)))
    assert not r.passed and r.reason == "class C: its worse end C is worse than the target B"


def test_interval_straddling_a_bound_counts_the_worse_end():
    card = make_card(eei=50.0, eei_ci=(48.0, 53.0))
    assert card.relative.display == "B (B-C)"
    assert not gate(card, target="B").passed
    assert gate(card, target="C").passed


def test_no_card_is_no_measurement():
    r = gate(None)
    assert not r.passed and r.reason.startswith("no measurement")


def test_card_without_trials_is_no_measurement():
    r = gate(make_card(trials=0))
    assert not r.passed and r.reason.startswith("no measurement: the variant has no protocol trials")


def test_changed_protocol_fails():
    r = gate(make_card(protocol_id="GO-1/b1/p64-n32"))
    assert not r.passed
    assert r.reason == "protocol changed: measured under GO-1/b1/p64-n32, but GO-1/b1 was recorded"


@pytest.mark.parametrize("card_tier,required,ok", [
    ("E1", "M1", False), ("M2", "M1", False), ("E1", "M2", False), ("M1", "M1", True),
    ("M2", "M2", True), ("M1", "E1", True), ("E1", None, True), ("E1", "E1", True)])
def test_tier_requirement(card_tier, required, ok):
    r = gate(make_card(tier=card_tier), tier=required)
    assert r.passed is ok
    if not ok:
        assert r.reason.startswith(f"tier {card_tier}") and f"tier {required} or better is required" in r.reason


def test_estimate_pass_says_estimated():
    r = gate(make_card(tier="E1"))
    assert r.passed and "estimated" in r.reason and "--allow-estimate" in r.reason and r.allow_estimate


@pytest.mark.parametrize("required", [None, "E1", "M2"])
def test_an_estimate_never_passes_without_allow_estimate(required):
    r = gate(make_card(tier="E1"), tier=required, allow=False)
    assert not r.passed and r.reason.startswith("tier E1 is an estimate") and "--allow-estimate" in r.reason
    assert gate(make_card(tier="M1"), tier=required, allow=False).passed  # a counter needs no flag


def test_downgraded_measurement_names_the_failed_check():
    r = gate(make_card(tier="M2", flags=("high-cv",)), tier="M1")
    assert not r.passed and "high-cv" in r.reason


def test_missing_task_fails():
    r = gate(make_card(tasks={"arc_easy": (0.6, 0.6)}))
    assert not r.passed and r.reason == "task piqa is missing from the evaluation"


def test_no_task_evaluated_with_a_budget_fails():
    r = gate(make_card(tasks={}), tasks=())
    assert not r.passed and "no task is expected" in r.reason


def test_accuracy_drop_over_budget_fails_and_at_budget_passes():
    over = gate(make_card(tasks={"arc_easy": (0.58, 0.60), "piqa": (0.64, 0.64)}))
    assert not over.passed and over.reason.startswith("task arc_easy: accuracy drop 0.02 exceeds the budget 0.01")
    at = gate(make_card(tasks={"arc_easy": (0.60, 0.61), "piqa": (0.64, 0.64)}))
    assert at.passed


def test_no_budget_still_requires_the_tasks():
    assert gate(make_card(), max_drop=None).passed
    assert "accuracy not gated" in gate(make_card(), max_drop=None).reason
    assert not gate(make_card(tasks={"piqa": (0.6, 0.6)}), max_drop=None).passed


def test_perplexity_budget_is_relative():
    card = make_card(perplexity=(10.5, 10.0))
    line = next(t for t in card.accuracy if t.task == "wikipedia")
    assert task_drop(line) == pytest.approx(0.05)
    assert not gate(card, max_drop=0.01, tasks=TASKS + ("wikipedia",)).passed
    assert gate(card, max_drop=0.06, tasks=TASKS + ("wikipedia",)).passed


def test_unknown_target_letter_fails():
    r = gate(make_card(), target="Q")
    assert not r.passed and "not in scheme relative-eu" in r.reason


def test_non_finite_score_fails():
    r = gate(make_card(tasks={"arc_easy": (math.nan, 0.6), "piqa": (0.6, 0.6)}))
    assert not r.passed and "no usable score" in r.reason


def test_every_failure_is_listed_first_is_the_reason():
    r = gate(make_card(eei=90, eei_ci=(85, 95), tier="E1", protocol_id="GO-1/b4",
                       tasks={"arc_easy": (0.3, 0.6)}), tier="M1")
    assert not r.passed and len(r.failures) == 5 and r.reason == r.failures[0]
    assert r.reason.startswith("protocol changed")


# ---------------------------------------------------------------------------- verify() on a real export


@pytest.fixture(scope="module")
def base_and_export(tmp_path_factory):
    from greenopt.compress import apply
    from greenopt.ship import ExportProvenance, export
    from greenopt.testing import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("verify")
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = tiny_llama()
    variant = Variant(name="depth-2", steps=(DepthStep(layers="1-2"),))
    report = apply(model, variant, tokenizer=tok)
    prov = ExportProvenance(base_model=str(root / "base"), protocol=protocol_preset("smoke"), apply_report=report)
    export(model, tok, variant, None, root / "export", provenance=prov)
    card = make_card(protocol_id=protocol_preset("smoke").id)  # as if measured when exported
    export(model, tok, variant, card, root / "labelled", provenance=prov)
    return root


def test_verify_export_end_to_end(base_and_export):
    spec = VerifySpec(source=str(base_and_export / "export"), target="G", meter="estimate", tasks=(),
                      device="cpu", allow_estimate=True)
    r = verify(spec)
    assert r.passed, r.reason
    assert r.card is not None and r.card.variant.name == "depth-2" and r.card.protocol_id == "GO-1/b1/p8-n4"
    assert r.card.model_id == str(base_and_export / "base")
    strict = verify(spec.model_copy(update={"require_tier": "M1"}))
    assert not strict.passed and strict.reason.startswith("tier E1 is an estimate")
    plain = verify(spec.model_copy(update={"allow_estimate": None}))
    assert not plain.passed and "--allow-estimate" in plain.reason


def test_verify_export_with_a_card_uses_its_recorded_schemes_and_tasks(base_and_export):
    folder = base_and_export / "labelled"
    assert (folder / "scheme-relative.yaml").is_file()
    r = verify(VerifySpec(source=str(folder), target="G", meter="estimate", device="cpu", tasks=(),
                          allow_estimate=True))
    assert r.passed, r.reason
    assert r.card.relative_scheme.name == "relative-eu" and r.card.variant.name == "depth-2"


def test_verify_refuses_another_protocol_before_measuring(base_and_export, monkeypatch):
    import greenopt.ship.gate

    monkeypatch.setattr(greenopt.ship.gate, "assess", lambda *a, **k: pytest.fail("must not measure"))
    r = verify(VerifySpec(source=str(base_and_export / "export"), target="G", protocol="cpu", tasks=()))
    assert not r.passed and r.reason.startswith("protocol changed: asked to measure under GO-1/b1/p64-n32")
    assert r.card is None


def test_verify_needs_tasks_for_a_budget(base_and_export):
    from greenopt.errors import ConfigError

    with pytest.raises(ConfigError, match="needs tasks"):
        verify(VerifySpec(source=str(base_and_export / "export"), target="G", max_drop=0.01, tasks=()))



def test_verify_recipe_gates_the_model_apply_ships(tmp_path, monkeypatch):
    """The recipe's calibration reaches assess, so a calibrated move is fitted as apply fits it."""
    import greenopt.ship.gate

    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: default\nvariant:\n  steps:\n  - {kind: depth, drop: 1}\n"
                      "evaluation: {tasks: []}\nprotocol: smoke\ncalibration: {samples: 7, seq_len: 64, seed: 5}\n"
                      "gate: {target: G}\n")
    seen = []

    class Stop(Exception):
        pass

    def fake_assess(spec, **_):
        seen.append(spec)
        raise Stop

    monkeypatch.setattr(greenopt.ship.gate, "assess", fake_assess)
    with pytest.raises(Stop):
        verify(VerifySpec(source=str(recipe)))
    assert seen[0].calib.model_dump() == {"samples": 7, "seq_len": 64, "seed": 5}


def test_verify_scores_the_users_own_tasks_from_include_path(base_and_export, tmp_path):
    from test_user_tasks import write_tasks

    folder = write_tasks(tmp_path / "tasks")
    r = verify(VerifySpec(source=str(base_and_export / "export"), target="G", meter="estimate", device="cpu",
                          tasks=("my_qa",), limit=3, include_path=str(folder), allow_estimate=True))
    assert r.passed, r.reason
    assert [t.task for t in r.card.accuracy] == ["my_qa"] and r.card.eval_limit == 3
