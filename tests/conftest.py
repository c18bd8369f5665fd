"""Shared test setup: one torch thread (2-core machines), quiet libraries, GPU skip."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Noise floors a user calibrated on this machine must not change what the tests measure.
os.environ["GREENOPT_CALIBRATION"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"greenopt-test-calibration-{os.getpid()}")
# measure calibrates on first use; tests that want it turn it back on (tests/test_calibrate.py).
os.environ["GREENOPT_AUTO_CALIBRATE"] = "0"
os.environ["GREENOPT_EVAL_CACHE"] = "0"  # tests that want the baseline cache turn it on themselves

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny llama checkpoint folder with its tokenizer (for CLI tests)."""
    from greenopt.testing import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
