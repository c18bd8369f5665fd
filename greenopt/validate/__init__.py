"""Recipe validation: the schema, cross-field rules, then a dry run on a tiny twin.

Example:
    >>> from greenopt.validate import validate_file
    >>> validate_file("recipes/ci/pinned-depth4.yaml").ok         # doctest: +SKIP
    True

``validate_file`` checks the schema, then cross-field rules (schemes load and the target
letters exist in them; bits and group sizes fit each method; the variant or sampled search
variants fit the model's architecture, checked on a meta-device copy built from its config),
then dry-runs variants on a tiny model of the same layer and head layout.
"""

from __future__ import annotations

from pathlib import Path

from greenopt.config.recipe import read_recipe_data, schema_problems
from greenopt.errors import ConfigError
from greenopt.records import Issue, ValidationReport
from greenopt.validate.checks import cross_field_issues
from greenopt.validate.dry_run import dry_run_issues


def validate_file(path: str | Path, *, dry_run: bool = True) -> ValidationReport:
    """Checks a recipe: schema, cross-field rules, then (if those pass) a dry run.

    Args:
        path: the recipe file.
        dry_run: apply one variant (the pinned one, or one sampled from the search space)
            to a tiny model shaped like the recipe's model.

    Returns:
        Every issue found, each with its field path.
    """
    where = str(path)
    try:
        data = read_recipe_data(path)
    except ConfigError as e:
        return ValidationReport(path=where, issues=(Issue(path="<file>", message=str(e)),))
    recipe, problems = schema_problems(data)
    issues = [Issue(path=where_, message=what) for where_, what in problems]
    if issues or recipe is None:
        return ValidationReport(path=where, issues=tuple(issues))
    issues, notes = cross_field_issues(recipe)
    if not issues and dry_run:
        more, dnotes = dry_run_issues(recipe)
        issues, notes = issues + more, notes + dnotes
    return ValidationReport(path=where, issues=tuple(issues), notes=tuple(notes))



__all__ = ["validate_file"]
