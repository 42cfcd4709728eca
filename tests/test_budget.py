import pytest

from baklava.errors import BudgetError
from baklava.profiles.budget import Budget


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("0.3", "fraction", 0.3),
        ("1.0", "fraction", 1.0),
        ("1", "tokens", 1),
        ("512", "tokens", 512),
        ("2GiB", "bytes", 2 * 2**30),
        ("1.5 MB", "bytes", 1.5e6),
        (" 0.05 ", "fraction", 0.05),
    ],
)
def test_parse_forms(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize(
    "text", ["0", "0.0", "1.5", "-0.3", "-1", "abc", "", "nan", "inf", "2 parsecs", "0GiB"]
)
def test_parse_rejects(text):
    with pytest.raises(BudgetError):
        Budget.parse(text)


def test_total_tokens_fraction_integer_and_memory():
    # 30 layers x 3 KV heads, context 8192, head_dim 64 (SmolLM2 shapes)
    assert Budget.parse("1.0").total_tokens(30, 3, 8192) == 90 * 8192
    assert Budget.parse("0.3").total_tokens(30, 3, 8192) == round(0.3 * 90 * 8192)
    assert Budget.parse("100").total_tokens(30, 3, 8192) == 9000
    # 1 MiB of fp16 KV for batch 2: 2**20 / (batch 2 * K,V 2 * head_dim 64 * 2 bytes) = 2048 slots
    assert Budget.parse("1MiB").total_tokens(30, 3, 8192, head_dim=64, batch=2, dtype_bytes=2) == 2048


def test_total_tokens_over_full_cache():
    with pytest.raises(BudgetError, match="more than the full cache"):
        Budget.parse("9000").total_tokens(30, 3, 8192)
    with pytest.raises(BudgetError, match="more than the full cache"):
        Budget.parse("100GiB").total_tokens(2, 2, 128, head_dim=64)
    with pytest.raises(BudgetError, match="no token slot"):
        Budget.parse("10B").total_tokens(2, 2, 128, head_dim=64)
