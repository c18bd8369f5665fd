"""Calibration and quick-look windows: BOS first, paragraph starts, held-aside text for the quick look."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing

from greenopt import offline
from greenopt.compress import calibration
from greenopt.compress.calibration import calibration_batch, leading_bos, text_windows
from greenopt.config import CalibSpec
from greenopt.errors import MoveError
from greenopt.testing import tiny_tokenizer

ARTICLES = ("The first paragraph of one.\nA second paragraph here.", "Another article starts.\nIt goes on.")


def _tok(bos: bool, adds: bool = True):
    """The tiny tokenizer with a BOS that it prepends to text (Llama's habit), one it defines but
    never adds (SmolLM2's ``<|im_start|>``), or none."""
    tok = copy.deepcopy(tiny_tokenizer())
    if not bos:
        tok.bos_token = None
    elif adds:
        tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    return tok


def test_every_window_starts_with_bos_where_the_tokenizer_puts_one_before_text():
    tok = _tok(bos=True)
    assert tok("a b").input_ids[0] == tok.bos_token_id
    w = text_windows(tok, ARTICLES, 4, 12, seed=0)
    assert w.shape == (4, 12) and (w[:, 0] == tok.bos_token_id).all()
    no_bos = text_windows(_tok(bos=False), ARTICLES, 4, 12, seed=0)
    assert no_bos.shape == (4, 12) and not (no_bos[:, 0] == tok.bos_token_id).all()


def test_a_bos_the_tokenizer_defines_but_never_adds_is_not_prepended():
    tok = _tok(bos=True, adds=False)
    assert tok.bos_token_id is not None and tok("a b").input_ids[0] != tok.bos_token_id
    assert leading_bos(tok) == [] and leading_bos(_tok(bos=True)) == [tok.bos_token_id]
    w = text_windows(tok, ARTICLES, 4, 12, seed=0)
    assert w.equal(text_windows(_tok(bos=False), ARTICLES, 4, 12, seed=0))


def test_windows_start_at_a_paragraph_not_mid_text():
    tok = _tok(bos=False)
    w = text_windows(tok, ARTICLES, 4, 6)
    paragraph_starts = {tuple(tok(p, add_special_tokens=False).input_ids[:3])
                        for a in ARTICLES for p in a.split("\n")}
    assert all(tuple(row[:3].tolist()) in paragraph_starts for row in w)


def test_seeded_windows_repeat_and_seeds_differ():
    tok = _tok(bos=True)
    assert text_windows(tok, ARTICLES, 6, 10, seed=3).equal(text_windows(tok, ARTICLES, 6, 10, seed=3))
    with pytest.raises(MoveError, match="shorter than one sample"):
        text_windows(tok, ("",), 1, 10)


def test_calibration_batch_carries_bos():
    tok = _tok(bos=True)
    calibration._CACHE.clear()
    batch = calibration_batch(tok, CalibSpec(samples=3, seq_len=16))
    assert batch.shape == (3, 16) and (batch[:, 0] == tok.bos_token_id).all()


def test_quick_look_scores_held_aside_text_not_calibration_text(monkeypatch):
    from greenopt.search import runner

    seen = []
    monkeypatch.setattr(runner, "text_windows", lambda tok, arts, n, t: seen.append(arts) or "windows")
    assert runner._perplexity_windows(_tok(bos=True), 2, 8) == "windows"
    assert seen == [offline.wiki_split("perplexity")] and seen[0] != offline.wiki_split("calibration")
