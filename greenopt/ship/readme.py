"""The README model card of an export: front matter, then greenopt's label section between markers."""

from __future__ import annotations

from pathlib import Path

from greenopt._io import write_text
from greenopt.records import ExportManifest, LabelCard

README = "README.md"
ORT = "onnxruntime-genai"
LLAMACPP = "llama.cpp"
_BEGIN, _END = "<!-- greenopt:label:begin -->", "<!-- greenopt:label:end -->"


def write_readme(folder: str | Path, card: LabelCard | None, manifest: ExportManifest | None) -> Path:
    """Writes (or updates) ``README.md``: front matter, then greenopt's section between markers.

    Text outside the markers (a user's own model card) is kept on re-rendering.
    """
    path = Path(folder) / README
    section = "\n".join([_BEGIN, render_readme_section(card, manifest), _END])
    if path.is_file() and _BEGIN in (old := path.read_text(encoding="utf-8")) and _END in old:
        head, rest = old.split(_BEGIN, 1)
        text = head + section + rest.split(_END, 1)[1]
    else:
        base = manifest.base_model_id if manifest else (card.model_id if card else "unknown")
        loader = manifest.loader if manifest is not None else "transformers"
        library = {ORT: ORT, LLAMACPP: "llama-cpp-python"}.get(loader, "transformers")
        text = (f"---\nlibrary_name: {library}\nbase_model: {base}\ntags:\n- greenopt\n- energy-label\n---\n\n"
                f"{section}\n")
    write_text(path, text)
    return path


def render_readme_section(card: LabelCard | None, m: ExportManifest | None) -> str:
    """The model-card section: class, J/token, device, runtime, accuracy, carbon, versions, loader."""
    out = ["## Energy label (greenopt)", ""]
    if m is not None:
        out += [f"Base model `{m.base_model_id}`, variant `{m.variant_name}` (hash `{m.variant.hash}`).", ""]
    if card is None:
        out += ["**Not measured.** This variant was applied without an energy measurement; run "
                "`greenopt verify DIR --target X` (or `greenopt measure`) to label it.", ""]
    else:
        c, r, d = card.candidate, card.runtime, card.device
        est = " — an estimate, not a counter reading" if card.estimated else ""
        out += [f"- **Relative class: {card.relative.display}** (EEI {card.relative.value:.1f}, 95% CI "
                f"{card.relative.interval[0]:.1f}–{card.relative.interval[1]:.1f}; scheme "
                f"{card.relative.scheme} v{card.relative.scheme_version})",
                "- Absolute: " + (f"class {card.absolute.display} ({card.absolute.scheme} v{card.absolute.scheme_version})"
                                   if card.absolute else f"not graded ({card.absolute_note})"),
                f"- J/token: {c.joules_per_token:.4g} (95% CI {c.joules_per_token_ci[0]:.4g}–"
                f"{c.joules_per_token_ci[1]:.4g}), tier {card.tier}{est}; baseline {card.baseline.joules_per_token:.4g}",
                f"- Device: {d.name} ({d.kind}); boundary {d.boundary}; meter {d.meter}",
                f"- Runtime: torch {r.torch}, transformers {r.transformers}, {r.attention}, {r.dtype}, batch "
                f"{r.batch_size}, {r.prompt_tokens} prompt + {r.new_tokens} new tokens",
                *([f"- Deployed on: {r.deployed.line()}"] if r.deployed else []),
                *([f"- Baseline on: {r.baseline.line()}"] if r.baseline else []),
                f"- Carbon: {card.carbon.g_per_1k_tokens:.3g} gCO2e per 1000 tokens at "
                f"{card.carbon.intensity_g_per_kwh:g} g/kWh", "",
                "| task | metric | variant | baseline | drop | n |", "|---|---|---|---|---|---|"]
        out += [f"| {t.task} | {t.metric} | {t.value:.4g} | {t.baseline:.4g} | {t.drop:+.4g} | {t.n} |"
                for t in card.accuracy] or ["| (no task evaluated) | | | | | |"]
        out += ["", f"Protocol {card.protocol_id}; label card v{card.card_version}; measured {card.date} "
                f"with greenopt {card.greenopt_version}. Full card: `LABEL.md`, `label.svg`, `label.json`."]
    if m is not None:
        out += ["", f"{how_to_load(m)} Exported {m.date} by greenopt {m.greenopt_version}; weights SHA-256 "
                f"`{m.weights_sha256[:16]}…`."]
    return "\n".join(out)


def how_to_load(m: ExportManifest) -> str:
    """Which runtime loads the export and how, in one or two Markdown sentences.

    Args:
        m: the export's manifest.

    Returns:
        E.g. ``Load with `greenopt.load(DIR)` (...); tokenizer with `AutoTokenizer.from_pretrained(DIR)`.``
    """
    dtype = m.variant.deploy.dtype
    if m.loader == ORT:
        return (f"Runs on ONNX Runtime GenAI (`{m.variant.deploy.describe()}`): {m.loader_reason}. Load with "
                "`import onnxruntime_genai as og; model = og.Model(DIR); tokenizer = og.Tokenizer(model)`.")
    if m.loader == LLAMACPP:
        return (f"Runs on llama.cpp (`{m.variant.deploy.describe()}`): {m.loader_reason}. Load with "
                "`llama_cpp.Llama(model_path=\"DIR/model.gguf\")` or `llama-cli -m DIR/model.gguf`; the "
                "tokenizer is in the file.")
    how = ("`transformers.AutoModelForCausalLM.from_pretrained(DIR)`" if m.loader == "transformers"
           else "`greenopt.load(DIR)` (transformers cannot load it: " + m.loader_reason + ")")
    where = f" The weights are {dtype}, as deployed and measured; load them as saved." if dtype != "auto" else ""
    return f"Load with {how}; tokenizer with `AutoTokenizer.from_pretrained(DIR)`.{where}"
