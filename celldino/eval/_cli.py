"""Arguments and set-up shared by `celldino embed`, `celldino eval knn` and `celldino eval linear`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import _dist

logger = logging.getLogger("celldino")


def add_model_arguments(parser: argparse.ArgumentParser, *, crop_default: int, batch_default: int) -> None:
    g = parser.add_argument_group("model and inputs")
    g.add_argument("--checkpoint", required=True, help="backbone weights: hub .pth, training teacher_checkpoint.pth, "
                   "a state dict, a celldino .safetensors export or a training checkpoint directory "
                   "(out/checkpoints/iter_N: its teacher); architecture inferred from the file")
    g.add_argument("--arch", default=None, help="override the inferred architecture (vit_small, vit_base, ...)")
    g.add_argument("--num-heads", type=int, default=None,
                   help="attention heads: needed only for a non-standard width / depth loaded from a file that does "
                        "not record it (a .pth; celldino .safetensors exports record it)")
    g.add_argument("--bag-of-channels", action="store_true",
                   help="channel-adaptive features: every channel encoded separately by a one-channel backbone, "
                        "features concatenated over channels")
    g.add_argument("--crop-size", type=int, default=crop_default,
                   help=f"center crop (pads when smaller); 0 keeps whole images (default {crop_default})")
    g.add_argument("--resize-size", "--resize", dest="resize_size", type=int, default=0,
                   help="resize the shorter side to this before cropping (bicubic, no antialias); 0 = no resize")
    g.add_argument("--batch-size", type=int, default=batch_default, help=f"images per batch (default {batch_default})")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading worker processes (default: 4, at most the CPU count)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="autocast dtype of the backbone (auto: fp16 on GPU as the reference, fp32 on CPU)")
    g.add_argument("--cache-dir", default=None,
                   help="resumable feature extraction: finished chunks are kept here and skipped on a rerun")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(args):
    """The backbone of --checkpoint, or None after printing a clear error."""
    from celldino.hub import load_backbone
    from celldino.models.checkpoint import CheckpointError

    try:
        kwargs = {} if args.num_heads is None else {"num_heads": args.num_heads}
        return load_backbone(args.checkpoint, arch=args.arch, **kwargs)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"celldino: cannot load --checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
        return None


def setup(args):
    """Logging and (under torchrun) the process group."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _dist.maybe_init_distributed()
    return _dist.is_main_process()


def autocast_arg(args):
    return "auto" if args.dtype == "auto" else args.dtype
