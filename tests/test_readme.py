"""The README's examples run: the testing-helper example behaves as the README says."""

import re

import pytest

from tests.conftest import REPO


def _block_after(heading):
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_testing_helper_example_catches_the_naive_float32_softmax():
    namespace = {}
    exec(compile(_block_after("## Testing your own kernel"), "README.md", "exec"), namespace)
    namespace["test_my_attention"]()  # the naive kernel is fine on small scores
    with pytest.raises(AssertionError, match="NaN where the oracle is not NaN"):
        namespace["test_my_softmax"]()  # float32 exp overflows beyond 88.7


def test_porting_example_runs_and_catches_a_misaligned_kernel():
    namespace = {}
    exec(compile(_block_after("### Porting a FlashAttention / SDPA test"), "README.md", "exec"), namespace)
    ns = namespace
    wrong = dict(ns["options"], causal_alignment="top_left")  # the kernel is bottom-right aligned
    with pytest.raises(AssertionError):
        ns["assert_attention_close"](ns["my_kernel"](ns["q"], ns["k"], ns["v"]), ns["q"], ns["k"], ns["v"], layout="bshd", **wrong)
