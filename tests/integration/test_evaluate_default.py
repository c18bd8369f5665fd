"""evaluate() on the real offline default model (SmolLM2-135M-Instruct): sane accuracy and perplexity."""

from __future__ import annotations

import math

import pytest

from greenopt.config import EvalSpec
from greenopt.evaluate import evaluate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    from greenopt.models import load_model

    model, tokenizer, _ = load_model("default")
    return model, tokenizer


def test_arc_easy_well_above_chance(default_model):
    """Four choices: chance is 0.25; SmolLM2-135M scores about 0.5-0.6 acc_norm on ARC-Easy."""
    model, tok = default_model
    s = evaluate(model, tok, EvalSpec(tasks=("arc_easy",), limit=50)).score("arc_easy")
    assert s.n == 50 and s.metric == "acc_norm"
    assert s.value > 0.35, s


def test_wikipedia_perplexity_sane(default_model):
    """Word perplexity of a 135M model on general Wikipedia prose is tens; a broken model's is
    thousands or more. Seed 13 picks two short general-interest articles (a children's book,
    amateur astronomy; 3.1k tokens; measured 40.5): whole 8k-token windows take minutes on a
    CPU, and word perplexity depends on the article (two taxonomy articles give about 165).
    """
    model, tok = default_model
    s = evaluate(model, tok, EvalSpec(tasks=("wikipedia",), limit=2, seed=13)).score("wikipedia")
    assert s.n == 2 and not s.higher_is_better
    assert math.isfinite(s.value) and 1.0 < s.value < 100.0, s
