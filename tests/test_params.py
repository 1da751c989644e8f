from dataclasses import dataclass

import pytest

from harness.errors import HarnessError
from harness.method import keep_count
from harness.params import build, parse_pairs


@dataclass
class P:
    f: float = 1.5
    n: int = 3
    flag: bool = False
    name: str | None = None


def test_coercion_from_strings():
    p = build(P, {"f": "2", "n": "7", "flag": "yes", "name": "none"}, what="method t")
    assert (p.f, p.n, p.flag, p.name) == (2.0, 7, True, None)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"g": "1"}, "unknown parameter 'g' for method t; its parameters: f"),
        ({"n": "1.5"}, "must be an integer"),
        ({"flag": "maybe"}, "must be true or false"),
        ({"f": "abc"}, "must be a number"),
    ],
)
def test_errors_name_the_problem(values, message):
    with pytest.raises(HarnessError, match=message):
        build(P, values, what="method t")


def test_parse_pairs():
    assert parse_pairs(["a=1", "b = x=y"], flag="--param") == {"a": "1", "b": "x=y"}
    with pytest.raises(HarnessError, match="key=value"):
        parse_pairs(["novalue"], flag="--param")


def test_keep_count():
    assert [keep_count(32, r) for r in (0.0, 0.25, 0.5, 0.75)] == [32, 24, 16, 8]
    with pytest.raises(HarnessError, match=r"in \[0, 1\)"):
        keep_count(32, 1.0)
    with pytest.raises(HarnessError, match="keeps 0 of 32"):
        keep_count(32, 0.99)
