"""Arguments and set-up shared by `celldino embed`, `celldino eval knn` and `celldino eval linear`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from celldino import dist as _dist

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
    g.add_argument("--config-file", default=None, metavar="NAME_OR_PATH",
                   help="eval config (recipe name, e.g. eval/cell_dino/vitl16_pretrain, or a yaml path), as the "
                        "reference's --config-file: its student.* settings the weights cannot tell (channel_adaptive, "
                        "interpolate_offset / _antialias, num_heads where the file records none) are used, what the weights tell (in_chans, "
                        "patch_size, arch, num_register_tokens) must agree with it, and its teacher backbone "
                        "param_dtype is the GPU autocast dtype. Explicit flags win over the config")
    g.add_argument("--config-overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="key=value overrides of --config-file (e.g. student.in_chans=4)")
    g.add_argument("--interpolate-offset", type=float, default=None,
                   help="pos-embed interpolation offset (default: the config's, else the checkpoint's record, "
                        "else 0.1 as every released model)")
    g.add_argument("--interpolate-antialias", action=argparse.BooleanOptionalAction, default=None,
                   help="antialiased pos-embed interpolation (default: the config's, else the checkpoint's record, "
                        "else off as every released model)")
    g.add_argument("--bag-of-channels", action="store_true",
                   help="channel-adaptive features: every channel encoded separately by a one-channel backbone, "
                        "features concatenated over channels (on by itself for a channel-adaptive model, e.g. "
                        "--config-file eval/cell_dino/vitl16_channel_adaptive_pretrain)")
    g.add_argument("--crop-size", type=int, default=crop_default,
                   help=f"center crop (pads when smaller); 0 keeps whole images (default {crop_default})")
    g.add_argument("--resize-size", "--resize", dest="resize_size", type=int, default=0,
                   help="resize the shorter side to this before cropping (bicubic, no antialias); 0 = no resize")
    g.add_argument("--batch-size", type=int, default=batch_default, help=f"images per batch (default {batch_default})")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading worker processes (default: 4, at most the CPU count)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["auto", "fp16", "bf16", "fp32"],
                   help="autocast dtype of the backbone (default: with --config-file its "
                        "compute_precision.teacher.backbone.mixed_precision.param_dtype on GPU, else auto; "
                        "auto: fp16 on GPU as the reference, fp32 on CPU)")
    g.add_argument("--cache-dir", default=None,
                   help="resumable feature extraction: finished chunks are kept here and skipped on a rerun")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(args):
    """The backbone of --checkpoint (with --config-file's settings, checked against it), or None after printing a
    clear error. With a config, also resolves args.dtype (when not given) and, for a channel-adaptive model,
    turns on args.bag_of_channels."""
    from celldino.hub import load_backbone
    from celldino.models.checkpoint import CheckpointError

    from .eval_config import ConfigMismatchError, check_backbone_matches_config, check_num_heads_matches_record

    try:
        cfg = eval_config(args)
    except ValueError as exc:
        print(f"celldino: {exc}", file=sys.stderr)
        return None
    kwargs = backbone_kwargs(args, cfg)
    try:
        if cfg is not None and args.num_heads is None and "num_heads" in kwargs:
            # the config's num_heads only where the file records none: the weights' shapes cannot tell it, so a
            # different value would load and compute other features
            check_num_heads_matches_record(recorded_num_heads(args.checkpoint), cfg,
                                           source=f"--checkpoint {args.checkpoint}",
                                           config_name=f"--config-file {args.config_file}")
        model = load_backbone(args.checkpoint, arch=args.arch, **kwargs)
        if cfg is not None:  # an explicit --arch replaces the config's: its width and depth are not compared
            check_backbone_matches_config(model, cfg, source=f"--checkpoint {args.checkpoint}",
                                          config_name=f"--config-file {args.config_file}",
                                          check_arch=args.arch is None)
    except ConfigMismatchError as exc:
        print(f"celldino: {exc}", file=sys.stderr)
        return None
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"celldino: cannot load --checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
        return None
    apply_model_to_feature_args(args, model, cfg)
    return model


def recorded_num_heads(path):
    """The head count the checkpoint file records (celldino .safetensors metadata, a training directory's
    meta.json, else the export `celldino train` writes beside a teacher_checkpoint.pth), None when it records none.
    Not the count inferred from a standard width: a config may set another for such a model (as training does).
    Reads metadata only, never the weights."""
    from celldino.hub import recorded_settings

    heads = recorded_settings(path).get("num_heads")
    return None if heads is None else int(heads)


def eval_config(args):
    """The merged --config-file (+ --config-overrides), or None without one."""
    from .eval_config import load_eval_config

    overrides = getattr(args, "config_overrides", None) or []
    if getattr(args, "config_file", None) is None:
        if overrides:
            raise ValueError(f"--config-overrides {' '.join(overrides)} need a --config-file to override")
        return None
    try:
        return load_eval_config(args.config_file, overrides)
    except ValueError as exc:
        raise ValueError(f"--config-file {args.config_file}: {exc}") from exc


def backbone_kwargs(args, cfg) -> dict:
    """load_backbone kwargs: explicit flags win over the config, which wins over the checkpoint's own record and
    celldino.hub.NON_INFERABLE_DEFAULTS (applied inside load_backbone)."""
    from .eval_config import backbone_kwargs_from_config

    kwargs = backbone_kwargs_from_config(cfg) if cfg is not None else {}
    explicit = {"num_heads": args.num_heads, "interpolate_offset": getattr(args, "interpolate_offset", None),
                "interpolate_antialias": getattr(args, "interpolate_antialias", None)}
    kwargs.update({k: v for k, v in explicit.items() if v is not None})
    return kwargs


def apply_model_to_feature_args(args, model, cfg) -> None:
    """Bag-of-channels features for a channel-adaptive model (the reference evaluates its channel-adaptive config
    with --bag-of-channels), and the config's autocast dtype when --dtype is not given."""
    if getattr(model, "channel_adaptive", False) and not args.bag_of_channels:
        logger.info("channel-adaptive backbone: bag-of-channels features (--bag-of-channels)")
        args.bag_of_channels = True
    if cfg is not None:
        from .eval_config import autocast_dtype_from_config

        args.dtype = resolve_autocast_dtype(args.dtype, autocast_dtype_from_config(cfg), args.device)
        logger.info("--config-file %s: channel_adaptive %s, interpolate_offset %s, interpolate_antialias %s, "
                    "autocast %s", args.config_file, model.channel_adaptive, model.interpolate_offset,
                    model.interpolate_antialias, args.dtype)


def resolve_autocast_dtype(explicit, config_dtype, device) -> str:
    """--dtype when given; else the config's dtype on GPU (the reference's eval precision; its CPU twin stays fp32,
    which is what "auto" means there); else "auto"."""
    if explicit is not None:
        return explicit
    if config_dtype is not None and _device_type(device) == "cuda":
        return config_dtype
    return "auto"


def _device_type(device) -> str:
    import torch

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, ValueError):  # a bad --device is reported where the device is used
        return "cpu"


def setup(args):
    """Logging and (under torchrun) the process group."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _dist.maybe_init_distributed()
    return _dist.is_main_process()


def autocast_arg(args):
    """The autocast dtype to pass on: --dtype (resolved with the config by load_model), "auto" when unset."""
    return args.dtype or "auto"
