"""kernels._dispatch: the CELLDINO_AUTOTUNE switch that trims every kernel's tuning sweep to its first config."""
import pytest

from celldino.kernels import _dispatch


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("on", True), ("0", False), ("off", False),
                                            ("false", False)])
def test_autotune_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("CELLDINO_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("CELLDINO_AUTOTUNE", value)
    assert _dispatch.autotune_enabled() is enabled
    assert _dispatch.tuning_space(["first", "second", "third"]) == (["first", "second", "third"] if enabled
                                                                     else ["first"])


def test_autotune_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("CELLDINO_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="CELLDINO_AUTOTUNE must be 0 or 1, got 'fast'"):
        _dispatch.autotune_enabled()
