"""Choose between a Triton kernel and its plain-torch reference.

`CELLDINO_KERNELS=triton|torch|auto` (default auto) or `set_backend()` forces a path:
- auto:   Triton for CUDA tensors when triton imports, the torch reference otherwise;
- triton: always Triton (CPU tensors only under TRITON_INTERPRET=1), error if impossible;
- torch:  always the reference.
"""
import os
import warnings

_VALID = ("auto", "triton", "torch")
_override = None


def set_backend(name):
    """Force a backend for this process (None restores the environment variable / auto)."""
    global _override
    if name is not None and name not in _VALID:
        raise ValueError(f"kernel backend must be one of {_VALID}, got {name!r}")
    _override = name


def backend():
    name = _override or os.environ.get("CELLDINO_KERNELS", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"CELLDINO_KERNELS must be one of {_VALID}, got {name!r}")
    return name


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_ok = None  # cached in a plain global, not functools.lru_cache: torch.compile traces this without warnings


def triton_available():
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception:
            _triton_ok = False
    return _triton_ok


def use_triton(*tensors):
    """True when the Triton implementation should run on these tensors."""
    name = backend()
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "triton":
        if not triton_available():
            raise RuntimeError("CELLDINO_KERNELS=triton but triton is not importable")
        if not (on_cuda or interpreting()):
            raise RuntimeError("CELLDINO_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 "
                               "set before celldino.kernels is imported to run Triton on the CPU")
        return True
    return on_cuda and triton_available()


def autotune_enabled():
    """CELLDINO_AUTOTUNE=0 keeps only each kernel's first (default) GPU config: no tuning sweep, so every new shape
    costs one compile instead of one per config (GPU tests, quick runs). Read when kernel modules are imported."""
    value = os.environ.get("CELLDINO_AUTOTUNE", "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"CELLDINO_AUTOTUNE must be 0 or 1, got {value!r}")
    return value not in ("0", "off", "false")


def tuning_space(configs):
    """The autotune list to use: all configs, or the first one when CELLDINO_AUTOTUNE=0."""
    return list(configs) if autotune_enabled() else list(configs[:1])


def autotune_configs(gpu_configs, interp_config):
    """triton.Config list for @triton.autotune: a small sweep on the GPU ((kwargs, num_warps, num_stages) each), one
    config under the interpreter (autotuning there only costs time). Call only where triton imports."""
    import triton
    if interpreting():
        return [triton.Config(interp_config, num_warps=4)]
    return tuning_space([triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in gpu_configs])


_compile_errors = None  # (RuntimeError, triton's CompilationError), resolved on the first launch


def launch_autotuned(tuned, grid, *args, **kwargs):
    """Launch a @triton.autotune kernel; a tuning config the installed Triton cannot compile must not end a run.

    Seen on an H200 with Triton 3.6: the pipeliner rejected one bf16 config of the attention's fused backward with
    64-row tiles (RuntimeError "PassManager::run failed"), although the config lowers ahead of time without the
    launch's argument specialisation. Then the kernel keeps only its default config (the first, the one the GPU
    tests check) for the rest of the process, with a warning. Kernels must be idempotent for autotuning anyway, so
    relaunching after a failed sweep is safe."""
    global _compile_errors
    if _compile_errors is None:
        from triton.compiler.errors import CompilationError
        _compile_errors = (RuntimeError, CompilationError)
    try:
        return tuned[grid](*args, **kwargs)
    except _compile_errors as exc:
        if len(tuned.configs) < 2:
            raise
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        warnings.warn(f"celldino kernels: autotuning {tuned.fn.__name__} failed ({type(exc).__name__}: "
                      f"{first_line}); using its default config {tuned.configs[0]} from now on", RuntimeWarning,
                      stacklevel=2)
        tuned.configs = tuned.configs[:1]
        return tuned[grid](*args, **kwargs)
