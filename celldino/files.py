"""Writing files so that a reader, a resumed run or a crash never sees half of one.

Every writer in celldino (configs, checkpoints, exports, embeddings, plots, benchmark CSVs, feature caches) goes
through `atomic_write`: the content is written to a temporary file beside the target, then renamed over it, so the
target holds the old content or the new, and a failed write leaves no temporary behind.
"""
import os
import uuid


def _process_umask():
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# what a file created with open() gets; some writers (safetensors) create private 0600 files instead
_FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path, write):
    """Call `write(tmp)` with a temporary path in `path`'s directory, then rename it to `path`; returns `path`.

    The temporary name ends with the target's file name, so writers that choose a format by extension (np.save,
    AnnData, safetensors) behave as for the target, and starts with ".tmp-", so directory scans skip it. The writer
    creates the file itself; it then gets the usual permissions (0666 less the umask), also from writers that
    create private 0600 files (safetensors). The parent directory is created when missing."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(os.fspath(path))}")
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path, text):
    """`text` to `path` (UTF-8), atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return atomic_write(path, write)


def atomic_torch_save(obj, path):
    """torch.save(obj) to `path`, atomically."""
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
