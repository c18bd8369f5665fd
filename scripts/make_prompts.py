"""Writes greenopt/data/prompts.jsonl: the fixed real-text prompts of energy protocol GO-1.

Source: the "prompts" split of the Wikipedia articles shipped in gensim 4.4.0's test data
(greenopt.offline.wiki_split), disjoint from the calibration and perplexity text. Each prompt is
the opening passage of one article: whole prose paragraphs from the article's start until
about 400 words, the last paragraph cut at a sentence end. Reproducible: same package, same
file, byte for byte. "article N" in each row's source is N in greenopt.offline.wiki_articles().

Usage:
    GREENOPT_HOME=~/.cache/greenopt python scripts/make_prompts.py [--count 16] [--words 400]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from greenopt.offline import GENSIM, wiki_split

OUT = Path(__file__).resolve().parent.parent / "greenopt" / "data" / "prompts.jsonl"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def passage(article: str, words: int) -> str | None:
    """The article's opening ~``words`` words of prose, or None if it has too little."""
    paras = [p.strip() for p in article.split("\n")]
    prose = [p for p in paras if len(p.split()) >= 8 and not p.startswith("Category:")]
    out: list[str] = []
    count = 0
    for p in prose:
        n = len(p.split())
        if count + n > words * 1.15:
            cut = _cut_at_sentence(p, words - count)
            if cut:
                out.append(cut)
                count += len(cut.split())
            break
        out.append(p)
        count += n
        if count >= words:
            break
    return "\n".join(out) if count >= words * 0.8 else None


def _cut_at_sentence(paragraph: str, want_words: int) -> str:
    """The paragraph up to the first sentence end after ``want_words`` words."""
    if want_words <= 0:
        return ""
    tokens = paragraph.split(" ")
    head = " ".join(tokens[:want_words])
    m = _SENTENCE_END.search(paragraph, len(head))
    return paragraph[: m.end()] if m else paragraph


def build(count: int, words: int) -> list[dict]:
    articles = wiki_split("prompts")
    rows = []
    for i, art in enumerate(articles):
        text = passage(art, words)
        if text is None:
            continue
        rows.append({"id": f"go1-{len(rows):02d}",
                     "source": f"gensim {GENSIM.version} enwiki test data, article {3 * i}",
                     "text": text})
        if len(rows) == count:
            break
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} articles have {words} words of prose; lower --count")
    return rows


def write_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prompts-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped data must be world-readable
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=16, help="number of prompts (default 16)")
    ap.add_argument("--words", type=int, default=400, help="words per prompt (default 400)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = build(args.count, args.words)
    write_atomic(args.out, rows)
    size = args.out.stat().st_size
    words = [len(r["text"].split()) for r in rows]
    print(f"wrote {len(rows)} prompts ({min(words)}-{max(words)} words, {size / 1024:.1f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
