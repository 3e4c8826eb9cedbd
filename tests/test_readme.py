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


def test_flex_example_judges_a_kernel_with_mods():
    import iem_ref as R

    def my_flex_kernel(q, k, v, **mods):  # the reference's float64 result rounded once: a correct kernel
        return R.attention(q, k, v, **mods)

    namespace = {"my_flex_kernel": my_flex_kernel}
    exec(compile(_block_after("## FlexAttention's `score_mod` and `mask_mod`"), "README.md", "exec"), namespace)
    ns = namespace
    with pytest.raises(AssertionError):  # the same output judged without the documents' mask
        ns["assert_attention_close"](ns["out"], ns["q"], ns["k"], ns["v"], score_mod=ns["mods"]["score_mod"])
