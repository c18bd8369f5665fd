"""GGUF files as transformers checkpoints: checked, converted once, cached, logits compared.

transformers reads a GGUF (``from_pretrained(folder, gguf_file=name)``) by dequantizing every
tensor, which takes seconds to minutes; greenopt does that once per file and keeps the result
as an ordinary safetensors folder. A user's file is cached by content under
``<greenopt home>/models/gguf-<sha256 prefix>``; the default model has its own fixed folder.
The folder appears only complete: it is written in a temporary folder next to it and renamed.

The other way, :func:`write` saves a dense llama-architecture model as a GGUF file for llama.cpp
(:mod:`greenopt.runtimes.llamacpp`), laid out as llama.cpp's own ``convert_hf_to_gguf.py`` writes it.

Example:
    >>> folder = converted(Path("my-model.Q4_K_M.gguf"))   # doctest: +SKIP
    >>> (folder / "model.safetensors").is_file()            # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from greenopt import offline
from greenopt.errors import ModelError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
PROVENANCE = "greenopt_gguf.json"
MAX_LOGIT_ERROR = 1e-4  # max |converted - GGUF| logit over max |GGUF| logit
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Energy is measured in joules."
_READ_ERRORS = (ValueError, IndexError, KeyError, struct.error, OSError)  # what gguf's reader raises on bad bytes


def is_gguf(path: Path) -> bool:
    """True for an existing file named ``*.gguf`` (any case)."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def cache_folder(path: Path) -> Path:
    """Where the converted checkpoint of ``path`` lives: keyed by the file's content, not its name."""
    return offline.home() / "models" / f"gguf-{sha256(path)[:16]}"


def converted(path: Path, dest: Path | None = None) -> Path:
    """The transformers folder converted from GGUF ``path``, converting it on first use.

    Args:
        path: a ``.gguf`` file.
        dest: where the converted folder goes (default: :func:`cache_folder`).

    Returns:
        A folder with ``config.json``, ``model.safetensors`` (fp32) and the tokenizer.

    Raises:
        ModelError: the file is truncated or not a GGUF, transformers cannot read its
            architecture, or the converted model does not reproduce the GGUF's logits.
    """
    dest = dest or cache_folder(path)
    if not (dest / "config.json").is_file():
        convert(path, dest)
    return dest


@functools.lru_cache(maxsize=32)
def _sha256(resolved: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(resolved, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (memoized per path, size and modification time)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def check(path: Path) -> str:
    """Checks that ``path`` is a complete GGUF file; returns its ``general.architecture``.

    Raises:
        ModelError: one line naming the file: not a GGUF, or truncated/corrupt.
    """
    import gguf  # lazy: a 0.3 s import, needed only for .gguf files

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(MAGIC) or MAGIC.startswith(head)):  # a short head may be a truncated GGUF
        raise ModelError(f"{path}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    if len(head) < 8:
        raise ModelError(f"{path}: truncated GGUF file ({size} bytes, shorter than its header); download it again")
    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except _READ_ERRORS as e:
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({_first_line(e)}); "
                         "download it again") from None
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file (tensor data needs {end} bytes, the file has {size}); "
                         "download it again")
    if not arch:
        raise ModelError(f"{path}: GGUF file has no general.architecture; it is not a model GGUF")
    return str(arch)


def convert(path: Path, dest: Path) -> None:
    """Converts GGUF ``path`` into the transformers folder ``dest``, atomically.

    The GGUF is dequantized to fp32 and saved with its tokenizer; the saved folder is read
    back and its logits on a short text must match the GGUF-loaded model's, else nothing is
    kept. If another process finished ``dest`` first, its folder is kept.

    Raises:
        ModelError: as :func:`converted`.
    """
    arch = check(path)
    log.info("converting %s (%s) to safetensors in %s (once)", path.name, arch, dest)
    model, tok = _read(path, arch)
    ids = _probe_ids(tok, int(model.config.vocab_size))
    ref = _logits(model, ids)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        del model
        err = _relative_error(_logits(_reload(staged), ids), ref)
        if err > MAX_LOGIT_ERROR:
            raise ModelError(f"{path}: the converted checkpoint does not reproduce the GGUF's logits (relative "
                             f"error {err:.1e} > {MAX_LOGIT_ERROR:.0e}); nothing was cached, report this")
        (staged / PROVENANCE).write_text(json.dumps({
            "gguf": path.name, "sha256": sha256(path), "architecture": arch,
            "max_logit_error": err}, indent=2) + "\n", encoding="utf-8")
        _publish(staged, dest)


def _read(path: Path, arch: str):
    """The model (fp32, quantizer markers removed) and tokenizer as transformers reads them from the GGUF."""
    import transformers  # lazy: heavy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as e:
        if "not supported" in str(e):
            raise ModelError(f"{path}: transformers {transformers.__version__} cannot read GGUF architecture "
                             f"{arch!r} (it reads {', '.join(_supported())}); pass the model's transformers "
                             "folder instead") from None
        raise ModelError(f"{path}: transformers could not read this GGUF: {_first_line(e)}") from None
    except (NotImplementedError, KeyError, struct.error, OSError) as e:
        raise ModelError(f"{path}: transformers could not read this GGUF: {_first_line(e)}") from None
    # The GGUF quantizer only marks how the weights were read; they are dense fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tok


def _reload(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM  # lazy: heavy

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _supported() -> list[str]:
    from transformers import modeling_gguf_pytorch_utils as mgu  # lazy: heavy

    return [a for a in mgu.GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _probe_ids(tok, vocab_size: int) -> torch.Tensor:
    ids = [i for i in tok(_PROBE_TEXT)["input_ids"][:32] if i < vocab_size]
    return torch.tensor([ids or list(range(min(32, vocab_size)))])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _publish(staged: Path, dest: Path) -> None:
    if dest.exists() and not (dest / "config.json").is_file():
        shutil.rmtree(dest)  # a folder left by an older, non-atomic greenopt
    try:
        os.rename(staged, dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
        log.info("%s was converted by another process meanwhile; keeping it", dest)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- write

#: The GGUF types :func:`write` stores a dense model's matrices in (vectors, e.g. norms, stay float32).
WRITE_DTYPES = ("float32", "float16", "bfloat16")
_WRITABLE = ("llama", "mistral")  # model_type values whose checkpoints are llama.cpp's ``llama`` architecture
# tokenizer.json pre-tokenizers (type, regex, digits split) -> llama.cpp's tokenizer.ggml.pre; the regexes are
# those llama.cpp's llama-vocab.cpp implements for each name.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_TOKENIZERS = {("ByteLevel(regex)",): "gpt-2", ("Digits", "ByteLevel(regex)"): "smollm",
                   (_LLAMA3_RE, "ByteLevel"): "llama-bpe", (_QWEN2_RE, "ByteLevel"): "qwen2"}


def write(model: torch.nn.Module, tokenizer: Any, path: Path, dtype: str = "float32") -> None:
    """Writes a dense llama-architecture causal LM and its tokenizer as one GGUF file (llama.cpp's ``llama``).

    As llama.cpp's ``convert_hf_to_gguf.py`` does: Q/K rows permuted to GGML's rotary layout, a tied
    output head left to the token embedding, the byte-level BPE vocab with its merges and special
    tokens. ``model`` is left as found; the caller makes the write atomic.

    Args:
        model: a transformers ``LlamaForCausalLM`` (or Mistral without sliding window), any dtype.
        tokenizer: its fast tokenizer (a ``tokenizer.json`` byte-level BPE).
        path: the ``.gguf`` file to write.
        dtype: the type of the matrices, one of :data:`WRITE_DTYPES`.

    Raises:
        ModelError: an architecture, activation, rope scaling, per-layer width or tokenizer llama.cpp's
            ``llama`` cannot take.
    """
    import gguf  # lazy: a 0.3 s import, needed only for .gguf files

    cfg = model.config
    _check_writable(cfg, dtype)
    state = model.state_dict()
    sizes = _layer_sizes(state, cfg)
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])
    ftype = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
             "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _hparams(w, cfg, sizes, n_vocab, int(ftype))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        cfg.to_json_file(str(Path(tmp) / "config.json"))
        _vocab(w, tokenizer, n_vocab, Path(tmp))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, sizes[0])
    for name, t in _tensors(state, cfg, sizes):
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"llama.cpp's llama architecture has no tensor for {name}; deploy this model on "
                             "runtime: transformers")
        data = t.detach().to("cpu", torch.float32).contiguous().numpy()
        if data.ndim <= 1 or dtype == "float32":
            w.add_tensor(new, data)
        elif dtype == "float16":
            w.add_tensor(new, data.astype("float16"))
        else:
            w.add_tensor(new, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check_writable(cfg: Any, dtype: str) -> None:
    if dtype not in WRITE_DTYPES:
        raise ModelError(f"GGUF matrices are written as {', '.join(WRITE_DTYPES)}, not {dtype}")
    what = None
    if cfg.model_type not in _WRITABLE:
        what = f"architecture {cfg.model_type}"
    elif getattr(cfg, "sliding_window", None):
        what = f"sliding-window attention ({cfg.sliding_window} tokens)"
    elif getattr(cfg, "hidden_act", "silu") != "silu":
        what = f"activation {cfg.hidden_act}"
    elif _rope(cfg).get("rope_type", "default") not in ("default", "linear"):
        what = f"rope scaling {_rope(cfg)['rope_type']}"
    if what is not None:
        raise ModelError(f"greenopt writes GGUF for llama-architecture checkpoints (llama, mistral without "
                         f"sliding window; silu; default or linear rope), not {what}; deploy on runtime: transformers")


def _rope(cfg: Any) -> dict:
    """The rope settings as transformers 5 (``rope_parameters``) or older (``rope_theta``/``rope_scaling``) keep them."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_theta": getattr(cfg, "rope_theta", 10000.0), **(getattr(cfg, "rope_scaling", None) or {})}


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _layer_sizes(state: dict[str, torch.Tensor], cfg: Any) -> tuple[int, int, int]:
    """(layers, FFN width, query heads, KV heads), read from the weights' shapes, the same in every layer."""
    d, sizes, i = _head_dim(cfg), set(), 0
    while f"model.layers.{i}.mlp.gate_proj.weight" in state:
        pre = f"model.layers.{i}."
        sizes.add((int(state[pre + "mlp.gate_proj.weight"].shape[0]),
                   int(state[pre + "self_attn.q_proj.weight"].shape[0]) // d,
                   int(state[pre + "self_attn.k_proj.weight"].shape[0]) // d))
        i += 1
    if not sizes:
        raise ModelError("the model has no llama decoder layers (model.layers.N.mlp.gate_proj); it cannot be "
                         "written as GGUF")
    if len(sizes) > 1:  # llama.cpp's llama loader sizes every layer's tensors from layer 0's
        raise ModelError("the layers differ in FFN width or head count (a width step on some layers); llama.cpp's "
                         "llama architecture takes one size for all layers: cut every layer, or deploy on transformers")
    return (i, *sizes.pop())


def _hparams(w: Any, cfg: Any, sizes: tuple[int, int, int, int], n_vocab: int, ftype: int) -> None:
    import gguf  # lazy: see write()

    rope, d = _rope(cfg), _head_dim(cfg)
    layers, n_ff, n_head, n_kv = sizes
    w.add_block_count(layers)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(d)
    if d != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(d)
        w.add_value_length(d)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(w: Any, tokenizer: Any, n_vocab: int, saved: Path) -> None:
    """The byte-level BPE vocab (tokens, types, merges, special ids), as convert_hf_to_gguf's gpt2 vocab."""
    import gguf  # lazy: see write()

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    pre = _PRE_TOKENIZERS.get(_pre_shape(spec.get("pre_tokenizer") or {}))
    if (spec.get("model") or {}).get("type") != "BPE" or pre is None:
        raise ModelError("greenopt writes GGUF vocabularies for byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, "
                         f"Qwen2 pre-tokenizers); this one is {(spec.get('model') or {}).get('type')} with pre-tokenizer "
                         f"{_pre_shape(spec.get('pre_tokenizer') or {})}; deploy on runtime: transformers")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ModelError(f"the tokenizer has ids up to {max(vocab.values())} but the model embeds {n_vocab} tokens")
    reverse, added = {i: t for t, i in vocab.items()}, tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = added[i].content
            special = added[i].special or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(saved, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _pre_shape(pre: dict) -> tuple[str, ...]:
    """A pre-tokenizer as the key of :data:`_PRE_TOKENIZERS`: its steps' regexes or types, in order."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre] if pre else []
    out = []
    for s in steps:
        kind = s.get("type")
        if kind == "Split":
            out.append(str((s.get("pattern") or {}).get("Regex", s.get("pattern"))))
        elif kind == "Digits":
            out.append("Digits" if s.get("individual_digits") else "Digits(grouped)")
        elif kind == "ByteLevel":
            out.append("ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel")
        else:
            out.append(str(kind))
    return tuple(out)


def _tensors(state: dict[str, torch.Tensor], cfg: Any, sizes: tuple[int, int, int, int]):
    """(transformers name, tensor) in GGUF's layout: Q/K rows permuted for GGML's rope, tied head left out."""
    embed = state["model.embed_tokens.weight"]
    for name, t in state.items():
        if name == "lm_head.weight" and (getattr(cfg, "tie_word_embeddings", False) or t.data_ptr() == embed.data_ptr()):
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            t = _permute(t, sizes[2] if ".q_proj." in name else sizes[3])
        yield name, t


def _permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows to GGML's interleaved pairs, per head (convert_hf_to_gguf's ``LlamaModel.permute``)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
