"""The checkpoint registry is an allowlist: loading builds only registered kinds and tensor classes."""

from __future__ import annotations

import json

import pytest
import torch

from greenopt.config import QuantizeStep, Variant
from greenopt.errors import ConfigError
from greenopt.models import checkpoint, module_kinds
from greenopt.ship import ExportProvenance, export, load
from greenopt.testing import tiny_llama, tiny_tokenizer

TORCHAO = Variant(steps=(QuantizeStep(method="torchao_int8", bits=8, group_size=32),))
HQQ = Variant(steps=(QuantizeStep(method="hqq", bits=4, group_size=32),))


def _export(tmp_path, variant):
    from greenopt.compress import apply

    model = tiny_llama()
    report = apply(model, variant, tokenizer=tiny_tokenizer())
    out = tmp_path / "out"
    export(model.eval(), tiny_tokenizer(), variant, None, out,
           provenance=ExportProvenance(base_model="tiny", apply_report=report))
    return out


def _tamper(folder, edit):
    path = folder / checkpoint.MODULES
    spec = json.loads(path.read_text())
    edit(next(iter(spec["modules"].values())))
    path.write_text(json.dumps(spec))


def test_every_kind_greenopt_writes_is_registered():
    assert set(module_kinds.KINDS) == {"packed_tied", "packed_linear", "packed_embedding", "bnb_4bit", "bnb_int8",
                                     "tensor_subclass"}


def test_a_manifest_naming_an_unknown_kind_is_refused(tmp_path):
    out = _export(tmp_path, HQQ)
    _tamper(out, lambda m: m.update(kind="pickle_module"))
    with pytest.raises(ConfigError, match="kind 'pickle_module'.*does not load"):
        load(out)


def test_a_manifest_naming_a_tensor_class_outside_the_allowlist_is_refused(tmp_path, monkeypatch):
    out = _export(tmp_path, TORCHAO)
    imported = []
    real = module_kinds.importlib.import_module
    monkeypatch.setattr(module_kinds.importlib, "import_module", lambda n: imported.append(n) or real(n))
    _tamper(out, lambda m: m["meta"].update(tensor_class="os:system"))
    with pytest.raises(ConfigError, match="tensor class os:system is not one greenopt loads"):
        load(out)
    assert "os" not in imported  # refused before anything is imported


def test_a_manifest_cannot_set_arbitrary_attributes(tmp_path):
    out = _export(tmp_path, TORCHAO)
    _tamper(out, lambda m: m["meta"]["attrs"].update(forward="x"))
    with pytest.raises(ConfigError, match="'forward' is not a greenopt_ scalar"):
        load(out)


def test_export_refuses_a_weight_tensor_class_it_could_not_load_back(tmp_path):
    class Foreign(torch.Tensor):
        @staticmethod
        def __tensor_flatten__(t):
            return [], None

    m = torch.nn.Linear(4, 4)
    m.weight = torch.nn.Parameter(torch.zeros(4, 4).as_subclass(Foreign), requires_grad=False)
    with pytest.raises(ConfigError, match="not one greenopt loads"):
        module_kinds.classify("layer", m)
