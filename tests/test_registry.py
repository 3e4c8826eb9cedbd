"""The registry is complete: every equation ID has a function, a derivation section and a test."""

import re

import pytest

from iem_ref import equations
from iem_ref.checks import CHECKS, run_checks
from iem_ref.cli import main
from tests.conftest import REPO  # the source tree: derivations and README are documents, not in the wheel

EXPECTED = (
    [f"A{i}" for i in range(1, 5)] + [f"T{i}" for i in range(1, 4)] + [f"H{i}" for i in range(1, 4)]
    + [f"S{i}" for i in range(1, 6)] + [f"P{i}" for i in range(1, 6)] + [f"K{i}" for i in range(1, 9)]
    + [f"G{i}" for i in range(1, 7)] + [f"M{i}" for i in range(1, 3)] + [f"V{i}" for i in range(1, 9)]
    + [f"F{i}" for i in range(1, 4)]
)


def test_registry_lists_exactly_the_equation_ids():
    assert list(equations.REGISTRY) == EXPECTED


@pytest.mark.parametrize("eq_id", EXPECTED)
def test_every_id_has_function_derivation_test_and_check(eq_id):
    eq = equations.REGISTRY[eq_id]
    for name in eq.functions:
        obj = equations.resolve(name)
        doc = getattr(obj, "__doc__", "") or ""
        if callable(obj) and not isinstance(obj, type):
            assert eq_id in doc, f"{name}'s docstring does not cite {eq_id}"
    path = REPO / eq.derivation
    assert path.exists(), f"{eq_id}: derivation file {path} is missing"
    assert re.search(rf"^## {eq_id}\b", path.read_text(), re.M), f"{eq_id}: no '## {eq_id}' section in {path.name}"
    assert equations.tests_for(REPO / "tests")[eq_id], f"{eq_id}: no test marked @pytest.mark.equation({eq_id!r})"
    assert eq_id in CHECKS, f"{eq_id}: no entry in iem-ref check"


def test_project_equation_list_names_every_id():
    text = (REPO / "derivations" / "README.md").read_text()
    missing = [eq_id for eq_id in EXPECTED if not re.search(rf"\b{eq_id}\b", text)]
    assert not missing, f"derivations/README.md does not list {missing}"


def test_check_command_passes_and_reports_every_id(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{eq_id}\s", out, re.M) for eq_id in EXPECTED)
    assert f"{len(EXPECTED)} passed, 0 failed" in out


def test_check_fails_loudly_on_a_wrong_result(monkeypatch):
    # A check that can fail: break one equation and the command must report it.
    monkeypatch.setitem(CHECKS, "A3", lambda: ("sabotaged", 1.0, 0.0))
    rows = {row[0]: row for row in run_checks()}
    assert rows["A3"][-1] is False
    assert main(["check"]) == 1


def test_equations_command_prints_the_map(capsys):
    assert main(["equations"]) == 0
    out = capsys.readouterr().out
    assert "competition.responsibilities" in out and "derivations/A_attention.md" in out


def test_readme_equation_map_matches_the_registry():
    from iem_ref.cli import markdown_map

    readme = (REPO / "README.md").read_text()
    assert markdown_map() in readme, "README's equation map is stale: regenerate with `iem-ref equations --markdown`"
