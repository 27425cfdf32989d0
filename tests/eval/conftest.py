"""Fixtures of the evaluation tests (helpers live in eval_helpers.py)."""
import pytest

from eval_helpers import tiny_vit


@pytest.fixture
def tiny_model():
    return tiny_vit()
