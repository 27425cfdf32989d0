"""Lower Triton kernels to sm_90 cubins without a GPU: CI has none, and the interpreter the CPU tests use never
lowers to PTX, so a kernel that only fails in code generation would otherwise pass every CPU test."""
import os
import subprocess
import sys


def run_lowering_script(script, cache_dir, timeout=600):
    """Run `script` (which compiles kernels with triton.compile and prints a count) in a fresh interpreter without
    TRITON_INTERPRET; returns its stdout, fails the test with its stderr."""
    # neither the interpreter nor CELLDINO_AUTOTUNE=0 (which would hide all configs but the first)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CELLDINO_AUTOTUNE")}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
