"""Label schemes, grading at every class bound, tier marking, scheme validation, carbon."""

from __future__ import annotations

import math

import pytest

from greenopt.errors import ConfigError
from greenopt.label import (
    DEFAULT_GRID_G_PER_KWH,
    LabelScheme,
    carbon_g_per_1k_tokens,
    grade,
    grade_comparison,
    grade_measurement,
    load_scheme,
)
from greenopt.records import Comparison, DeviceInfo, EnergyMeasurement, TrialFigures

EU = load_scheme("relative-eu")
GO1 = load_scheme("absolute-go1")
EU_BOUNDS = [("A", 41), ("B", 51), ("C", 64), ("D", 80), ("E", 100), ("F", 125)]
GO1_BOUNDS = [("A", 0.125), ("B", 0.25), ("C", 0.5), ("D", 1), ("E", 2), ("F", 4)]
CASES = [(EU, b) for b in EU_BOUNDS] + [(GO1, b) for b in GO1_BOUNDS]


def _measurement(jpt: float, tier: str = "M1", protocol_id: str = "GO-1/b1") -> EnergyMeasurement:
    dev = DeviceInfo(kind="cuda", name="test gpu", meter="nvml", boundary="GPU board (NVML)")
    trial = TrialFigures(energy_j=jpt * 512, duration_s=10.0, generated_tokens=512, prompt_tokens=512)
    return EnergyMeasurement(joules_per_token=jpt, joules_per_token_ci=(jpt * 0.98, jpt * 1.02),
                             trials=(trial,) * 5, tokens_per_s=51.2, mean_power_w=jpt * 51.2, cv=0.01,
                             tier=tier, source_tier=tier, device=dev, protocol_id=protocol_id)


def test_shipped_schemes_match_the_spec():
    assert EU.metric == "eei" and GO1.metric == "joules_per_token"
    assert [(c.letter, c.max) for c in EU.classes] == EU_BOUNDS + [("G", None)]
    assert [(c.letter, c.max) for c in GO1.classes] == GO1_BOUNDS + [("G", None)]
    assert "2019/2016" in EU.description and EU.protocol == GO1.protocol == "GO-1"


@pytest.mark.parametrize("scheme,bound", CASES, ids=[f"{s.name}-{b[0]}" for s, b in CASES])
def test_every_bound_on_above_below(scheme, bound):
    letter, bound_value = bound
    nxt = scheme.letters[scheme.letters.index(letter) + 1]
    assert scheme.letter_for(bound_value) == letter  # on the bound: the better class
    assert scheme.letter_for(math.nextafter(bound_value, math.inf)) == nxt
    assert scheme.letter_for(math.nextafter(bound_value, 0)) == letter
    assert scheme.letter_for(bound_value * 1.001) == nxt
    assert scheme.letter_for(bound_value * 0.999) == letter
    g = grade(bound_value, (bound_value, bound_value), scheme, "M1")
    assert (g.letter, g.letter_range, g.worst_letter, g.display) == (letter, (letter,), letter, letter)


def test_extremes():
    assert EU.letter_for(0) == "A" and EU.letter_for(1e9) == "G"
    assert GO1.letter_for(0.0) == "A" and GO1.letter_for(6.9) == "G"


def test_straddling_interval_prints_both_letters():
    g = grade(50.0, (49.0, 52.0), EU, "M1")
    assert (g.letter, g.letter_range, g.worst_letter) == ("B", ("B", "C"), "C")
    assert g.display == "B (B-C)"
    g = grade(52.0, (50.0, 53.0), EU, "M1")
    assert g.display == "C (B-C)" and g.worst_letter == "C"
    wide = grade(50.0, (40.0, 65.0), EU, "M1")
    assert wide.letter_range == ("A", "D") and wide.display == "B (A-D)" and wide.worst_letter == "D"


def test_interval_touching_a_bound_stays_in_class():
    g = grade(45.0, (41.0001, 51.0), EU, "M1")
    assert g.letter_range == ("B",) and g.display == "B"


def test_point_outside_interval_widens_range():
    g = grade(52.0, (45.0, 50.0), EU, "M1")
    assert g.letter == "C" and g.letter_range == ("B", "C") and g.worst_letter == "C"
    assert g.interval == (45.0, 50.0)


@pytest.mark.parametrize("tier,plain,straddle", [
    ("M1", "B", "C (B-C)"),
    ("M2", "B (M2)", "C (B-C, M2)"),
    ("E1", "~B (estimated)", "~C (B-C, estimated)"),
])
def test_tier_marking(tier, plain, straddle):
    assert grade(48.0, (46.0, 50.0), EU, tier).display == plain
    assert grade(55.0, (50.0, 56.0), EU, tier).display == straddle


@pytest.mark.parametrize("scheme", [EU, GO1], ids=["relative", "absolute"])
def test_estimate_is_never_a_plain_letter(scheme):
    for c in scheme.classes:
        value = (c.max or 1e6) * 0.99
        g = grade(value, (value, value), scheme, "E1")
        assert g.estimated and g.display.startswith("~") and "estimated" in g.display
        assert g.display not in scheme.letters


def test_absolute_e1_measurement_is_graded_but_estimated():
    g = grade_measurement(_measurement(0.3, tier="E1"), GO1)
    assert g.letter == "C" and g.estimated and g.display == "~C (estimated)"
    assert grade_measurement(_measurement(0.3, tier="M1"), GO1).display == "C"
    assert grade_measurement(_measurement(0.3, tier="M2"), GO1).display == "C (M2)"


def test_grade_comparison_takes_the_worse_tier():
    base, cand = _measurement(1.0, "M1"), _measurement(0.45, "M2")
    comp = Comparison(eei=45.0, eei_ci=(44.0, 46.0), baseline=base, candidate=cand)
    g = grade_comparison(comp, EU)
    assert (g.letter, g.tier, g.display, g.metric, g.scheme_version) == ("B", "M2", "B (M2)", "eei", 1)


def test_scheme_metric_and_protocol_checks():
    comp = Comparison(eei=45.0, eei_ci=(44.0, 46.0), baseline=_measurement(1.0), candidate=_measurement(0.45))
    with pytest.raises(ConfigError, match="grade_measurement"):
        grade_comparison(comp, GO1)
    with pytest.raises(ConfigError, match="grade_comparison"):
        grade_measurement(_measurement(0.3), EU)
    with pytest.raises(ConfigError, match="assumes protocol GO-1"):
        grade_measurement(_measurement(0.3, protocol_id="GO-10/b1"), GO1)
    assert GO1.accepts_protocol("GO-1/b8") and GO1.accepts_protocol("GO-1")
    assert not GO1.accepts_protocol("GO-2/b1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_grade_rejects_bad_numbers(bad):
    with pytest.raises(ValueError):
        grade(bad, (1.0, 2.0), EU, "M1")
    with pytest.raises(ValueError):
        grade(1.5, (bad, 2.0), EU, "M1")


def test_grade_rejects_backwards_interval():
    with pytest.raises(ValueError, match="backwards"):
        grade(50.0, (52.0, 48.0), EU, "M1")


_HEAD = "name: custom\nversion: 1\nmetric: eei\nprotocol: GO-1\n"


@pytest.mark.parametrize("text,needle", [
    (_HEAD + "classes: [{letter: A, max: 50}, {letter: B, max: 40}, {letter: C, max: null}]", "classes: "),
    (_HEAD + "classes: [{letter: A, max: 50}, {letter: A, max: 60}, {letter: C, max: null}]", "duplicate"),
    (_HEAD + "colour: red\nclasses: [{letter: A, max: 50}, {letter: B, max: null}]", "colour"),
    (_HEAD + "classes: [{letter: A, max: 50}, {letter: B, max: 60}]", "open-ended"),
    (_HEAD + "classes: [{letter: A, max: null}, {letter: B, max: 60}]", "open-ended"),
    (_HEAD + "classes: [{letter: A, max: 50}, {letter: B, max: null}, {letter: C, max: null}]", "open-ended"),
    (_HEAD + "classes: [{letter: A, max: 50, color: x}, {letter: B, max: null}]", "classes.0.color"),
    (_HEAD + "classes: [{letter: a, max: 50}, {letter: B, max: null}]", "classes.0.letter"),
    (_HEAD + "classes: [{letter: A, max: .inf}, {letter: B, max: null}]", "classes.0.max"),
    (_HEAD.replace("eei", "watts") + "classes: [{letter: A, max: 1}, {letter: B, max: null}]", "metric"),
    ("name: x\nversion: 1\nmetric: eei\nclasses: [{letter: A, max: 1}, {letter: B, max: null}]", "protocol"),
    ("name: [unclosed\n  version: 1", "not valid YAML"),
    ("- just\n- a list\n", "YAML mapping"),
])
def test_malformed_scheme_files(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_scheme(p)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(p) in msg


def test_unknown_scheme_name_lists_shipped_ones():
    with pytest.raises(ConfigError, match="relative-eu") as e:
        load_scheme("no-such-scheme")
    assert "\n" not in str(e.value)


def test_custom_scheme_from_path_round_trips(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(_HEAD + "classes: [{letter: A, max: 90}, {letter: B, max: 110}, {letter: C, max: null}]")
    s = load_scheme(str(p))
    assert s.letters == ("A", "B", "C") and s.letter_for(90) == "A" and s.letter_for(110.5) == "C"
    assert LabelScheme.model_validate(s.model_dump()) == s
    assert load_scheme(s) is s


def test_carbon_arithmetic():
    assert DEFAULT_GRID_G_PER_KWH == 475.0
    assert carbon_g_per_1k_tokens(1.0) == pytest.approx(0.1319444, rel=1e-6)
    assert round(carbon_g_per_1k_tokens(1.0), 3) == 0.132
    assert carbon_g_per_1k_tokens(0.0) == 0.0
    assert carbon_g_per_1k_tokens(2.5, 100.0) == pytest.approx(2.5 * 1000 / 3.6e6 * 100)
    assert carbon_g_per_1k_tokens(3.6, 1000.0) == pytest.approx(1.0)  # 3.6 kJ per 1000 tok = 1 Wh
    with pytest.raises(ValueError):
        carbon_g_per_1k_tokens(-1.0)
    with pytest.raises(ValueError):
        carbon_g_per_1k_tokens(1.0, float("nan"))
