"""celldino data layer: decoders (io), intensity scaling, datasets, augmentation, masking, collate, loaders.

`celldino.data.build_dataset(spec, transform=None, target_transform=None)` is the entry point for
`Name:key=value:...` dataset strings (see docs/data.md). Submodules are imported lazily so that importing
`celldino.data.crop_params` (e.g. from the fused-augmentation extension) stays light.
"""

import importlib

__all__ = ["build_dataset", "read_image", "ImageReadError", "DatasetError"]

_LAZY = {
    "build_dataset": "celldino.data.datasets",
    "DatasetError": "celldino.data.datasets",
    "read_image": "celldino.data.io",
    "ImageReadError": "celldino.data.io",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'celldino.data' has no attribute {name!r}")
