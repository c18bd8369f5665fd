"""Recipes: shipped files validate, round-trip, map onto SearchSpec; the dry run catches what
the static checks cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from greenopt.config import SearchSpec, SpaceSpec, load_variant
from greenopt.config.recipe import Recipe, dump_recipe, load_recipe
from greenopt.errors import ConfigError
from greenopt.search import space as sp
from greenopt.validate import validate_file
from greenopt.validate.dry_run import (
    _layers_needed,
    _twin_groups,
    corner_params,
    sample_variant,
    tiny_twin,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# Every recipe file under recipes/: label schemes (labels/) and the variant files recipes point
# at (variants/) are not recipes; ci/*.yml is a GitHub workflow and does not match *.yaml.
_NOT_RECIPES = ("labels", "variants")
SHIPPED = sorted(p for p in RECIPES.glob("**/*.yaml")
                 if p.relative_to(RECIPES).parts[0] not in _NOT_RECIPES)
VARIANTS = sorted((RECIPES / "variants").glob("*.yaml"))


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"cpu-demo.yaml", "gpu-1b-8b.yaml", "int8-only.yaml", "moe-sparsify.yaml", "pinned-depth4.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_pass_schema_and_cross_field_rules(path):
    report = validate_file(path, dry_run=False)
    assert report.ok, [i.line() for i in report.issues]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipes_validate_with_the_dry_run(path):
    # The full validation users run: schema, cross-field rules and the dry run on a tiny twin
    # (the seeded sample and the corners of a search space, or the pinned variant).
    report = validate_file(path)
    assert report.ok, [i.line() for i in report.issues]
    assert any(n.startswith("dry run:") for n in report.notes), report.notes


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_shipped_variant_files_load(path):
    assert not load_variant(path).is_baseline  # steps, or a deployment other than the reference


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip_load_dump_load(path, tmp_path):
    r = load_recipe(path)
    text = dump_recipe(r)
    again = tmp_path / path.name
    again.write_text(text)
    assert load_recipe(again) == r
    assert dump_recipe(load_recipe(again)) == text


def test_round_trip_with_a_full_protocol_and_inline_variant(tmp_path):
    data = {"model": {"id": "default", "dtype": "float32"}, "protocol": {"preset": "mine", "new_tokens": 48,
            "trials": 7}, "variant": {"name": "q", "steps": [{"kind": "quantize", "method": "rtn", "bits": 8}]},
            "gate": {"target": "C", "require_tier": "M2"}, "calibration": {"samples": 8}}
    r = load_recipe(_write(tmp_path, data))
    assert r.resolved_protocol().id == "GO-1/b1/p256-n48" and r.protocol_preset_name() is None
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(r))
    assert load_recipe(again) == r


def test_variant_file_reference_is_inlined_relative_to_the_recipe():
    r = load_recipe(RECIPES / "ci" / "pinned-depth4.yaml")
    assert r.variant is not None and r.variant.name == "depth-4" and r.variant.steps[0].kind == "depth"


def test_search_spec_sets_every_field():
    r = load_recipe(RECIPES / "cpu-demo.yaml")
    spec = r.search_spec()
    assert set(SearchSpec.model_fields) - {"version"} <= spec.model_fields_set
    assert (spec.model, spec.target, spec.scheme, spec.fidelity.protocol) == ("default", "A", "relative-eu", "cpu")
    assert spec.fidelity.eval.tasks == ("arc_easy", "piqa") and spec.space.methods == ("bnb_nf4", "rtn")
    assert spec.space.dtypes == ("bfloat16",) and spec.space.runtimes == ("onnxruntime-genai",)
    assert spec.name == "cpu-demo" and spec.calib == r.calibration


def test_search_spec_refuses_a_pinned_recipe():
    with pytest.raises(ConfigError, match="pins a variant"):
        load_recipe(RECIPES / "ci" / "pinned-depth4.yaml").search_spec()


def test_load_recipe_names_the_first_bad_field(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml: search.space.bitz: Extra inputs are not permitted"):
        load_recipe(_write(tmp_path, {"search": {"space": {"bitz": [4]}}}))


def test_sample_variant_moves_every_dimension():
    space = SpaceSpec(bits=(16, 4), methods=("hqq", "rtn"), moefy_experts=(4,), heads_keep=(0.5,))
    v = sample_variant(space, 4, seed=3)
    assert {s.kind for s in v.steps} == {"depth", "width", "moefy", "prune", "quantize"}
    assert sample_variant(space, 4, seed=3) == v


def test_dry_run_applies_a_pinned_variant_to_a_twin(tiny_dir, tmp_path):
    data = {"model": str(tiny_dir), "variant": {"steps": [
        {"kind": "depth", "layers": "1"},
        {"kind": "quantize", "method": "hqq", "bits": 4, "group_size": 32, "target": {"layers": "0-2"}}]}}
    report = validate_file(_write(tmp_path, data))
    assert report.ok, [i.line() for i in report.issues]
    assert any("applied to a tiny 4-layer twin" in n for n in report.notes)


def test_dry_run_catches_a_step_broken_by_an_earlier_one(tiny_dir, tmp_path):
    # Each step alone fits the 4-layer model (the static check passes); after dropping a layer,
    # layer 3 no longer exists, which only running the variant reveals.
    data = {"model": str(tiny_dir), "variant": {"steps": [
        {"kind": "depth", "layers": "0"},
        {"kind": "quantize", "method": "rtn", "bits": 8, "target": {"layers": "3"}}]}}
    static = validate_file(_write(tmp_path, data), dry_run=False)
    assert static.ok
    report = validate_file(_write(tmp_path, data))
    assert [i.path for i in report.issues] == ["variant"]
    assert "dry run failed" in report.issues[0].message


def test_recipe_model_accepts_a_bare_string():
    assert Recipe.model_validate({"model": "x", "variant": {}}).model.id == "x"


_DEPTH_AND_GROUPS = SpaceSpec(bits=(16, 4), methods=("rtn",), layer_groups=3, split_attn_ffn=True,
                              prune=(), depth_drop_max=0.5, moefy_experts=())


def test_layers_needed_adds_back_the_layers_a_depth_cut_removes():
    # Regression: quantize overrides index the layers left after the depth cut, so the twin
    # needs those indices plus the dropped layers (here 4 dropped of 8, groups over 4 left).
    params = {"depth.drop": 4, "bits.g0.attn": 4, "bits.g1.attn": 16, "bits.g1.ffn": 4, "bits.g2.attn": 4}
    v = sp.build(params, _DEPTH_AND_GROUPS, 8)
    assert v.steps[0].kind == "depth" and v.steps[1].overrides
    assert _layers_needed(v) == 8
    from greenopt.compress import apply
    from greenopt.testing import tiny_tokenizer
    apply(tiny_twin(None, _layers_needed(v), []), _twin_groups(v), tokenizer=tiny_tokenizer())


def test_dry_run_covers_a_space_with_depth_and_quantized_groups(tiny_dir, tmp_path):
    data = {"model": str(tiny_dir), "search": {"target": "A", "seed": 0, "space": {
        **_DEPTH_AND_GROUPS.model_dump(include={"bits", "methods", "layer_groups", "split_attn_ffn",
                                                "depth_drop_max"}), "prune": [], "moefy_experts": []}},
            "evaluation": {"tasks": ["arc_easy"]}}
    data["search"]["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["search"]["space"].items()}
    report = validate_file(_write(tmp_path, data))
    assert report.ok, [i.line() for i in report.issues]


def test_corners_cover_the_extremes_of_the_space():
    space = SpaceSpec(bits=(16, 8, 4), methods=("rtn", "hqq"), heads_keep=(0.75, 0.5), moefy_experts=(4, 8),
                      moefy_top_k=(1, 2), depth_drop_max=0.5, ffn_keep_min=0.5, prune=())
    corners = dict(corner_params(space, 8))
    by = {d.name: d for d in sp.dims(space, 8)}
    bit_dims = [n for n in by if n.startswith("bits.g")]
    uniform = [p for p in corners.values() if "depth.drop" in p and all(p.get(n) == 4 for n in bit_dims)]
    assert {p["quant.method"] for p in uniform} == {"rtn", "hqq"}
    assert all(p["depth.drop"] == by["depth.drop"].high for p in uniform)
    assert any(len({p.get(n) for n in bit_dims}) > 1 and "depth.drop" in p for p in corners.values())
    assert {"width.ffn_keep": 0.5} in corners.values()
    assert {p.get("width.heads_keep") for p in corners.values()} >= {0.75, 0.5}
    assert {p.get("moefy.experts") for p in corners.values()} >= {4, 8}
    assert corner_params(space, 8) == corner_params(space, 8)  # deterministic
