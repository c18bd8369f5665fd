"""Model files as users hand them over: damaged folders, GGUF files, hub ids without a hub.

Every failure is one ModelError line naming the file and the fix. GGUF files are written
in-process from a tiny llama with the ``gguf`` package (the layout llama.cpp's converter writes).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from greenopt import offline
from greenopt.cli import main
from greenopt.errors import ModelError
from greenopt.models import ACCEPTS, default_model_dir, load_model, resolve
from greenopt.models import gguf as gguf_files
from greenopt.models.checkpoint import MODULES, WEIGHTS
from greenopt.testing import tiny_llama, tiny_tokenizer

PROBE = torch.arange(1, 20).unsqueeze(0)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROBE).logits


def _saved(folder: Path, **save) -> Path:
    tiny_llama().save_pretrained(folder, **save)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _exported(folder: Path) -> Path:
    """A greenopt-loader export (packed RTN weights + greenopt_modules.json)."""
    from greenopt.compress import apply
    from greenopt.config import QuantizeStep, Variant
    from greenopt.ship import export

    variant = Variant(steps=(QuantizeStep(method="rtn", bits=8, group_size=32),))
    model = tiny_llama()
    apply(model, variant, tokenizer=tiny_tokenizer())
    assert export(model, tiny_tokenizer(), variant, None, folder).loader == "greenopt"
    return folder


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _error(spec: str) -> str:
    with pytest.raises(ModelError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _permute(w, n_head: int):
    # llama.cpp's convert_hf_to_gguf.py permutes q/k rows for its rope layout; transformers undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model=None, arch: str = "llama") -> Path:
    """Writes ``model`` (default: tiny_llama()) and tiny_tokenizer() as an F32 GGUF file."""
    import gguf

    model = model or tiny_llama()
    cfg, tok = model.config, tiny_tokenizer()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, key in (("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                          ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + key + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty greenopt home, so conversions land in tmp_path."""
    h = tmp_path / "home"
    monkeypatch.setenv("GREENOPT_HOME", str(h))
    return h


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---------------------------------------------------------------------------- damaged folders


@pytest.mark.parametrize("keep", [4, 100, -1000, -1])
def test_truncated_safetensors_names_the_file_and_the_fix(tmp_path, keep):
    folder = _saved(tmp_path / "m")
    _cut(folder / "model.safetensors", keep)
    msg = _error(str(folder))
    assert msg.startswith(f"{folder / 'model.safetensors'}: truncated or corrupt safetensors file")
    assert "re-download" in msg


def test_safetensors_with_trailing_garbage_is_corrupt(tmp_path):
    folder = _saved(tmp_path / "m")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    assert "truncated or corrupt safetensors file" in _error(str(folder))


def test_truncated_export_weights_say_re_export(tmp_path):
    folder = _exported(tmp_path / "export")
    assert load_model(str(folder))[2].source == "local"  # the intact export loads
    _cut(folder / WEIGHTS, -500)
    msg = _error(str(folder))
    assert msg.startswith(f"{folder / WEIGHTS}: truncated or corrupt safetensors file")
    assert "re-export" in msg


def test_export_without_weights_or_with_a_broken_manifest(tmp_path):
    folder = _exported(tmp_path / "export")
    (folder / MODULES).write_text("{not json")
    assert _error(str(folder)).startswith(f"{folder / MODULES}: not valid JSON")
    shutil.rmtree(folder)
    folder = _exported(folder)
    (folder / WEIGHTS).unlink()
    assert "no weights" in _error(str(folder))


def test_config_that_is_not_json(tmp_path):
    folder = _saved(tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    msg = _error(str(folder))
    assert msg.startswith(f"{folder / 'config.json'}: not valid JSON (")
    assert "re-download" in msg


def test_folder_without_weights(tmp_path):
    folder = _saved(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    msg = _error(str(folder))
    assert msg.startswith(f"{folder}: no weights") and "re-download" in msg


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    folder = _saved(tmp_path / "m", max_shard_size="200KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(load_model(str(folder))[0]), _logits(tiny_llama()))
    _cut(shards[0], -100)
    assert _error(str(folder)).startswith(f"{shards[0]}: truncated or corrupt")
    shards[0].unlink()
    assert _error(str(folder)).startswith(f"{shards[0]}: shard listed in model.safetensors.index.json is missing")


def test_cli_prints_one_line_for_a_damaged_folder(tmp_path, capsys):
    folder = _saved(tmp_path / "m")
    _cut(folder / "model.safetensors", -1000)
    capsys.readouterr()
    assert main(["measure", "--model", str(folder), "--protocol", "smoke"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt safetensors file" in err[0], err


# ---------------------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("keep", [0, 6, 30, 1000, 0.5, -1])
def test_truncated_gguf_names_the_file(tmp_path, tiny_gguf, home, keep):
    bad = tmp_path / "cut.gguf"
    size = tiny_gguf.stat().st_size
    bad.write_bytes(tiny_gguf.read_bytes()[: int(size * keep) if isinstance(keep, float) else keep])
    msg = _error(str(bad))
    assert msg.startswith(f"{bad}: truncated"), msg
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_file_that_is_not_a_gguf(tmp_path, home):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 64)
    assert _error(str(fake)) == f"{fake}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file"


def test_user_gguf_converts_once_into_a_content_keyed_cache(tmp_path, tiny_gguf, home, monkeypatch):
    model, tok, info = load_model(str(tiny_gguf))
    assert info.source == "gguf" and info.model_id == str(tiny_gguf)
    assert torch.allclose(_logits(model), _logits(tiny_llama()), atol=1e-5, rtol=1e-5)
    assert tok("energy")["input_ids"] == tiny_tokenizer()("energy")["input_ids"]
    folder = home / "models" / f"gguf-{gguf_files.sha256(tiny_gguf)[:16]}"
    assert info.path == str(folder)
    assert [p.name for p in (home / "models").iterdir()] == [folder.name]  # no temporary folder left
    assert json.loads((folder / gguf_files.PROVENANCE).read_text())["max_logit_error"] <= gguf_files.MAX_LOGIT_ERROR

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_files, "convert", no_second_conversion)
    renamed = tmp_path / "same-bytes.GGUF"
    shutil.copy(tiny_gguf, renamed)
    assert resolve(str(renamed)) == ("gguf", str(folder))


def test_conversion_that_changes_the_logits_keeps_nothing(tiny_gguf, home, monkeypatch):
    real = gguf_files._reload

    def drifted(folder):
        m = real(folder)
        with torch.no_grad():
            m.model.norm.weight.mul_(1.01)
        return m

    monkeypatch.setattr(gguf_files, "_reload", drifted)
    msg = _error(str(tiny_gguf))
    assert msg.startswith(f"{tiny_gguf}: the converted checkpoint does not reproduce the GGUF's logits")
    assert list((home / "models").iterdir()) == []


def test_gguf_architecture_transformers_cannot_read(tmp_path, home):
    path = _write_gguf(tmp_path / "odd.gguf", arch="toyarch")
    msg = _error(str(path))
    assert msg.startswith(f"{path}: transformers ") and "cannot read GGUF architecture 'toyarch'" in msg
    assert "llama" in msg  # names what it can read


def test_default_model_goes_through_the_same_conversion(tiny_gguf, home, monkeypatch):
    monkeypatch.setattr(offline, "gguf_path", lambda: tiny_gguf)
    folder = default_model_dir()
    assert folder == home / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").is_file() and (folder / gguf_files.PROVENANCE).is_file()
    _cut(folder / "model.safetensors", -10)
    assert f"delete {folder} and greenopt converts the GGUF again" in _error("default")


@pytest.mark.integration
def test_real_gguf_file_matches_the_default_model(tmp_path, monkeypatch):
    default, _, _ = load_model("default")
    path = offline.gguf_path()
    monkeypatch.setenv("GREENOPT_HOME", str(tmp_path / "home"))
    model, tok, info = load_model(str(path))
    assert info.source == "gguf" and info.num_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, default(ids).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- paths and hub ids


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "a/b/c", "~/no-such-greenopt-model"])
def test_missing_path_says_no_such_folder(spec):
    msg = _error(spec)
    assert ": no such folder" in msg and ACCEPTS in msg


def test_missing_path_under_an_existing_folder_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "models/mine: no such folder" in _error("models/mine")
    assert _error("mine.gguf").startswith("mine.gguf: no such file")


def test_folder_holding_only_a_gguf_points_at_the_file(tmp_path, tiny_gguf):
    shutil.copy(tiny_gguf, tmp_path / "model.gguf")
    assert _error(str(tmp_path)) == f"{tmp_path}: folder has no config.json; it holds model.gguf: pass that file"


def test_hub_id_in_offline_mode_is_one_line_and_quick(monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    assert _error("org/name") == f"no model hub is reachable for 'org/name'; {ACCEPTS}"
    assert time.monotonic() - start < 5
    assert "Retrying" not in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_hub_id_with_an_unreachable_hub_is_one_line(monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.monotonic()
    assert _error("org/name") == f"no model hub is reachable for 'org/name'; {ACCEPTS}"
    assert time.monotonic() - start < 10
    assert "Retrying" not in capfd.readouterr().err


def test_cached_hub_model_still_loads_without_a_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    _saved(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    model, _, info = load_model("org/tiny")
    assert info.source == "hub" and torch.equal(_logits(model), _logits(tiny_llama()))


def test_a_truncated_export_fails_in_one_line_through_ship_load(tmp_path):
    from greenopt.compress import apply
    from greenopt.config import QuantizeStep, Variant
    from greenopt.ship import ExportProvenance, export, load

    model, variant = tiny_llama(), Variant(steps=(QuantizeStep(method="hqq", bits=4, group_size=32),))
    report = apply(model, variant, tokenizer=tiny_tokenizer())
    out = tmp_path / "out"
    export(model.eval(), tiny_tokenizer(), variant, None, out,
           provenance=ExportProvenance(base_model="tiny", apply_report=report))
    weights = out / "greenopt-model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="greenopt-model.safetensors.*(truncated|corrupt)"):
        load(out)


def test_a_llama_cpp_export_is_named_not_called_a_broken_checkpoint(tmp_path):
    from greenopt.errors import ModelError
    from greenopt.models.files import check_folder

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="a llama.cpp export"):
        check_folder(tmp_path)
