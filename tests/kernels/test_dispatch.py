"""kernels._dispatch: the CELLDINO_AUTOTUNE switch that trims every kernel's tuning sweep to its first config, and
launch_autotuned's fallback to the default config when a tuning config does not compile."""
import warnings

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


def plain_kernel():
    pass


class FakeTuner:
    """An autotuned kernel whose sweep hits a config the compiler rejects (as Triton 3.6 did on an H200)."""
    fn = plain_kernel

    def __init__(self):
        self.configs = ["default", "breaks the pipeliner"]
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.calls.append(list(self.configs))
            if len(self.configs) > 1:
                raise RuntimeError("PassManager::run failed")
        return launch


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_autotune_compile_failure_falls_back_to_the_default_config():
    tuner = FakeTuner()
    with pytest.warns(RuntimeWarning, match="autotuning plain_kernel failed .*PassManager::run failed.*default"):
        _dispatch.launch_autotuned(tuner, (4,))
    assert tuner.calls == [["default", "breaks the pipeliner"], ["default"]] and tuner.configs == ["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more tuning, no warning
        _dispatch.launch_autotuned(tuner, (4,))
    assert tuner.calls[-1] == ["default"]


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_a_failure_of_the_default_config_itself_is_raised():
    class AlwaysFails(FakeTuner):
        def __getitem__(self, grid):
            def launch(*args, **consts):
                raise RuntimeError("illegal memory access")
            return launch

    tuner = AlwaysFails()
    tuner.configs = ["default"]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _dispatch.launch_autotuned(tuner, (4,))
