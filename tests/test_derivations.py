"""Run the code in ``derivations/*.md`` so that a derivation cannot rot.

Each Markdown file is one test: its fenced ```python blocks are extracted in
order and executed in one fresh namespace (later blocks see the names of
earlier ones, nothing leaks between files).  A failing block is reported by
file, block number and Markdown line; tracebacks point into the Markdown file.

The registry scanner (``iem_ref.equations.tests_for``) reads the
``@pytest.mark.equation`` line literally, so each group has its own test
function with its IDs written out.  ``test_every_derivation_file_is_run``
fails when a file appears in ``derivations/`` without a test here, so a new
file cannot be skipped silently.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

DERIVATIONS = Path(__file__).resolve().parent.parent / "derivations"

# A block opens with a line that is exactly ```python (optionally indented by
# nothing) and closes with the next line that is exactly ```.
_OPEN = re.compile(r"^```python\s*$")
_CLOSE = re.compile(r"^```\s*$")
_SECTION = re.compile(r"^## ([A-Z]\d)\b")


def python_blocks(text):
    """Return ``[(first_line, code), ...]`` for the ```python blocks of ``text`` (1-based lines)."""
    blocks, current, start = [], None, 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if current is None:
            if _OPEN.match(line):
                current, start = [], lineno + 1
        elif _CLOSE.match(line):
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    if current is not None:
        raise ValueError(f"unclosed ```python block starting at line {start - 1}")
    return blocks


def sections_without_code(text):
    """IDs whose ``## <ID>`` section holds no ```python block (every equation is checked)."""
    missing, current, has_code = [], None, False
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m or line.startswith("## "):
            if current is not None and not has_code:
                missing.append(current)
            current, has_code = (m.group(1) if m else None), False
        elif _OPEN.match(line):
            has_code = True
    if current is not None and not has_code:
        missing.append(current)
    return missing


def run_derivation(name):
    path = DERIVATIONS / name
    text = path.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert blocks, f"{name}: no ```python blocks to run"
    missing = sections_without_code(text)
    assert not missing, f"{name}: sections without a checking code block: {missing}"
    namespace = {"__name__": f"derivations.{path.stem}", "__file__": str(path)}
    for number, (line, code) in enumerate(blocks, start=1):
        # Pad with blank lines so that tracebacks give the Markdown line numbers.
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        try:
            exec(compiled, namespace)
        except Exception as exc:  # noqa: BLE001 - re-raised with the block named
            pytest.fail(
                f"{name}: python block {number} (line {line}) failed: {type(exc).__name__}: {exc}\n"
                + "".join(traceback.format_exception(exc)[-3:]),
                pytrace=False,
            )


@pytest.mark.equation("A1", "A2", "A3", "A4")
def test_derivation_A_attention():
    run_derivation("A_attention.md")


@pytest.mark.equation("T1", "T2", "T3")
def test_derivation_T_temperature():
    run_derivation("T_temperature.md")


@pytest.mark.equation("H1", "H2", "H3")
def test_derivation_H_hard_limit():
    run_derivation("H_hard_limit.md")


@pytest.mark.equation("S1", "S2", "S3", "S4", "S5")
def test_derivation_S_scalar_activations():
    run_derivation("S_scalar_activations.md")


@pytest.mark.equation("P1", "P2", "P3", "P4", "P5")
def test_derivation_P_posterior_statistics():
    run_derivation("P_posterior_statistics.md")


@pytest.mark.equation("K1", "K2", "K3", "K4", "K5", "K6", "K7", "K8")
def test_derivation_K_kernels():
    run_derivation("K_kernels.md")


@pytest.mark.equation("G1", "G2", "G3", "G4", "G5", "G6")
def test_derivation_G_gradients():
    run_derivation("G_gradients.md")


@pytest.mark.equation("M1", "M2")
def test_derivation_M_streaming():
    run_derivation("M_streaming.md")


@pytest.mark.equation("V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8")
def test_derivation_V_variants():
    run_derivation("V_variants.md")


@pytest.mark.equation("F1", "F2", "F3")
def test_derivation_F_flex():
    run_derivation("F_flex.md")


def test_derivation_readme():
    run_derivation("README.md")


_COVERED = {
    "A_attention.md",
    "T_temperature.md",
    "H_hard_limit.md",
    "S_scalar_activations.md",
    "P_posterior_statistics.md",
    "K_kernels.md",
    "G_gradients.md",
    "M_streaming.md",
    "V_variants.md",
    "F_flex.md",
    "README.md",
}


def test_every_derivation_file_is_run():
    on_disk = {p.name for p in DERIVATIONS.glob("*.md")}
    assert on_disk == _COVERED, f"derivation files without a test: {sorted(on_disk - _COVERED)}; tests without a file: {sorted(_COVERED - on_disk)}"


def test_collector_finds_blocks_and_lines():
    """The extractor itself: block order, first lines, and a section without code is reported."""
    text = "## A1 x\n```python\na = 1\n```\ntext\n```python\nb = a + 1\n```\n## A2 y\n```text\nno\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (7, "b = a + 1\n")]
    assert sections_without_code(text) == ["A2"]
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks("```python\nx = 1\n")
