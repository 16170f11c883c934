"""The torch pins agree across pyproject.toml, requirements.txt and environment.yml."""

import re

from conftest import REPO


def pins(text: str) -> set[str]:
    return set(re.findall(r"(torch(?:vision)?==[0-9.]+)", text))


def test_pins_are_consistent() -> None:
    expected = {"torch==2.14.1", "torchvision==0.29.1"}
    for name in ("pyproject.toml", "requirements.txt", "environment.yml", "Makefile"):
        assert pins((REPO / name).read_text()) == expected, name
