"""celldino: a fast, faithful implementation of Cell-DINO (DINOv2 for multi-channel fluorescence microscopy)."""

__version__ = "0.1.0"
