"""The docstring examples of every reference module run, and every public function has one.

Covers ``iem_ref.{competition, energies, summaries, attention, activations,
gradients, mixtures, streaming}``.
(The exact tier, the accelerated paths and ``iem_ref.testing`` test their own.)
"""

import doctest
import importlib
import inspect

import pytest

MODULES = ["competition", "energies", "summaries", "attention", "activations", "gradients", "mixtures", "streaming", "flex"]


def _module(name):
    return importlib.import_module(f"iem_ref.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = _module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    report = []
    for test in finder.find(module, globs=dict(vars(module))):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"iem_ref.{name} has no docstring examples"
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_an_example(name):
    module = _module(name)
    with_examples = {t.name.rsplit(".", 1)[-1] for t in doctest.DocTestFinder().find(module) if t.examples}
    missing = [
        attr
        for attr in getattr(module, "__all__", [])
        if inspect.isfunction(getattr(module, attr)) and attr not in with_examples
    ]
    assert not missing, f"iem_ref.{name}: public functions without a docstring example: {missing}"
