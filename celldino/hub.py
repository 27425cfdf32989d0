"""Load and export Cell-DINO backbones: `load_backbone`, the reference hub constructors, `celldino export`.

    model = celldino.hub.load_backbone("cell_dino_hpa_vitl16.pth")              # any supported format
    model = celldino.hub.cell_dino_hpa_vitl16(pretrained_path="weights.pth")    # reference hub name
    celldino export --checkpoint out/eval/training_44999/teacher_checkpoint.pth --output-dir exported
    celldino export --checkpoint out/checkpoints/iter_00000042 --output-dir exported   # a training checkpoint dir

Weights are only read from local files (the released Cell-DINO weights are distributed by request, see
docs/models.md); nothing is downloaded. Loading is strict (see celldino.models.checkpoint).
"""
import argparse
import logging
import os
import sys
from enum import Enum

import torch

from celldino.models import ARCHS, DinoVisionTransformer, arch_builder
from celldino.models.checkpoint import (CheckpointError, backbone_export_metadata,
                                        infer_model_kwargs, load_backbone_state_dict, load_state_dict_strict,
                                        read_checkpoint_metadata, remap_block_keys, save_pth, save_safetensors,
                                        safetensors_metadata)
from celldino.models.vision_transformer import arch_of

logger = logging.getLogger("celldino")

# settings that the weights cannot tell; defaults = every released Cell-DINO model
NON_INFERABLE_DEFAULTS = dict(interpolate_offset=0.1, interpolate_antialias=False, channel_adaptive=False)
MODEL_KWARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                "ffn_bias", "proj_bias", "init_values", "ffn_layer", "block_chunks", "num_register_tokens",
                "interpolate_antialias", "interpolate_offset", "channel_adaptive", "drop_path_rate",
                "drop_path_uniform")


class Weights(Enum):
    CELL_DINO = "CELL-DINO"


def _build(arch, kwargs, source):
    """A DinoVisionTransformer from arch (or explicit dims) and kwargs."""
    kwargs = dict(kwargs)
    if arch is not None:
        dims = ARCHS[str(arch).removesuffix("_memeff")] if str(arch).removesuffix("_memeff") in ARCHS else None
        builder = arch_builder(arch)
        for key in ("embed_dim", "depth"):
            if dims is not None and key in kwargs and kwargs[key] != dims[key]:
                raise CheckpointError(f"{source}: arch {arch} has {key} {dims[key]} but the weights have "
                                      f"{kwargs[key]}")
        for key in ("embed_dim", "depth", "num_heads"):
            if dims is not None and kwargs.get(key) == dims[key]:
                kwargs.pop(key)
        return builder(**kwargs)
    if kwargs.get("num_heads") is None:
        raise CheckpointError(f"{source}: embed_dim {kwargs.get('embed_dim')} / depth {kwargs.get('depth')} is not a "
                              f"standard arch ({sorted(ARCHS)}) and the file does not record num_heads (the weights "
                              "cannot tell it): pass --num-heads N on the command line (num_heads=N in Python); a "
                              "celldino .safetensors export (written beside every exported .pth) records it")
    if int(kwargs["num_heads"]) < 1 or kwargs["embed_dim"] % int(kwargs["num_heads"]):
        raise CheckpointError(f"{source}: num_heads {kwargs['num_heads']} does not divide embed_dim "
                              f"{kwargs['embed_dim']}")
    return DinoVisionTransformer(**kwargs)


TEACHER_EXPORT_SIBLINGS = {"teacher_checkpoint.pth": "teacher_backbone.safetensors"}


def _sibling_export_metadata(path):
    """Model settings of the safetensors export that `celldino train` writes beside a reference-format
    teacher_checkpoint.pth (eval/training_<iter>/): what the weights cannot tell (num_heads of a non-standard size,
    the arch name). Empty for any other file."""
    sibling = TEACHER_EXPORT_SIBLINGS.get(os.path.basename(os.fspath(path)))
    if sibling is None:
        return {}
    sibling = os.path.join(os.path.dirname(os.fspath(path)), sibling)
    if not os.path.isfile(sibling):
        return {}
    return safetensors_metadata(sibling)


def recorded_settings(path):
    """The model settings a checkpoint records (its own metadata over that of the export beside a training
    teacher_checkpoint.pth), read without its weights: what load_backbone takes from the file rather than infers."""
    return {**_sibling_export_metadata(path), **read_checkpoint_metadata(path)}


def backbone_kwargs_from_checkpoint(path, arch=None, **model_kwargs):
    """(arch, model kwargs, backbone state dict): inferred from the weights, then the file's metadata (celldino
    exports; for a training teacher_checkpoint.pth, the export written beside it; for a training checkpoint
    directory, its meta.json's teacher_backbone), then the non-inferable
    defaults, overridden by model_kwargs."""
    source = os.fspath(path)
    state_dict, metadata = load_backbone_state_dict(path)
    metadata = {**_sibling_export_metadata(path), **metadata}
    inferred = infer_model_kwargs(state_dict, source)
    kwargs = dict(NON_INFERABLE_DEFAULTS)
    kwargs.update({k: v for k, v in inferred.items() if k != "arch"})
    kwargs.update({k: v for k, v in metadata.items() if k in MODEL_KWARGS and k not in ("init_values",)})
    if inferred["init_values"] is None:
        kwargs["init_values"] = None
    # shape-determined values always come from the weights, whatever the metadata says
    kwargs.update({k: inferred[k] for k in ("patch_size", "in_chans", "embed_dim", "depth", "num_register_tokens",
                                             "ffn_layer", "img_size")})
    kwargs.update(model_kwargs)
    if arch is None:
        arch = metadata.get("arch") or inferred["arch"]
    return arch, kwargs, state_dict


def load_backbone(path, arch=None, **model_kwargs):
    """Build the backbone a checkpoint file describes and load its weights strictly; returns it in eval mode.

    path: hub .pth, training teacher_checkpoint.pth, unchunked / prefixed state dicts, a celldino
    .safetensors export, or a `celldino train` checkpoint directory checkpoints/iter_<n>/ (its teacher backbone,
    with the settings recorded in its meta.json). arch ("vit_small" | "vit_base" | "vit_large" | "vit_giant2") and any
    DinoVisionTransformer kwarg (e.g. block_chunks=0, channel_adaptive=True, interpolate_offset=0.0) override what
    is inferred; block keys are remapped to the block_chunks used.
    """
    source = os.fspath(path)
    arch, kwargs, state_dict = backbone_kwargs_from_checkpoint(path, arch, **model_kwargs)
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = _build(arch, kwargs, source)
    load_state_dict_strict(model, state_dict, source, assign=True)
    name = arch or f"custom ViT (width {model.embed_dim}, depth {model.n_blocks}, {model.num_heads} heads)"
    logger.info("loaded %s, patch %d, %d channels, img_size %d, from %s", name, model.patch_size,
                model.config["in_chans"], model.config["img_size"], source)
    return model.eval()


# ---- reference hub names --------------------------------------------------------------------------------------------

def _make_cell_dino_model(*, arch_name, patch_size, img_size, in_chans, pretrained, pretrained_path, pretrained_url,
                          weights, channel_adaptive=False, **kwargs):
    if isinstance(weights, str):
        try:
            weights = Weights[weights]
        except KeyError:
            raise ValueError(f"unsupported weights {weights!r}; expected one of {[w.name for w in Weights]}") from None
    vit_kwargs = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, init_values=1.0,
                      ffn_layer="mlp", block_chunks=4, num_register_tokens=0, interpolate_antialias=False,
                      interpolate_offset=0.1, channel_adaptive=channel_adaptive)
    vit_kwargs.update(kwargs)
    if not pretrained:
        return arch_builder(arch_name)(**vit_kwargs)
    if pretrained_path is None:
        if pretrained_url is not None:
            raise ValueError(f"celldino does not download weights (got pretrained_url={pretrained_url!r}): "
                             "download the file yourself (Cell-DINO weights come by request, see "
                             "docs/models.md) and pass pretrained_path=<local file>")
        raise ValueError("pass pretrained_path=<local weights file>, or pretrained=False for random weights")
    state_dict, _ = load_backbone_state_dict(pretrained_path)
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = arch_builder(arch_name)(**vit_kwargs)
    load_state_dict_strict(model, state_dict, os.fspath(pretrained_path), assign=True)
    return model.eval()


def cell_dino_hpa_vitl16(*, pretrained_url=None, pretrained_path=None, pretrained=True, weights=Weights.CELL_DINO,
                         in_channels=4, **kwargs):
    """Cell-DINO ViT-L/16 pretrained on HPA (single cells, or fields of view: two released checkpoints)."""
    return _make_cell_dino_model(arch_name="vit_large", patch_size=16, img_size=224, in_chans=in_channels,
                                 pretrained=pretrained, pretrained_path=pretrained_path,
                                 pretrained_url=pretrained_url, weights=weights, **kwargs)


def cell_dino_hpa_vitl14(*, pretrained_url=None, pretrained_path=None, pretrained=True, weights=Weights.CELL_DINO,
                         in_channels=4, **kwargs):
    """Cell-DINO ViT-L/14 (img_size 518) pretrained on HPA fields of view."""
    return _make_cell_dino_model(arch_name="vit_large", patch_size=14, img_size=518, in_chans=in_channels,
                                 pretrained=pretrained, pretrained_path=pretrained_path,
                                 pretrained_url=pretrained_url, weights=weights, **kwargs)


def cell_dino_cp_vits8(*, pretrained_url=None, pretrained_path=None, pretrained=True, weights=Weights.CELL_DINO,
                       in_channels=5, **kwargs):
    """Cell-DINO ViT-S/8 (img_size 128, 5 channels) pretrained on the combined cell painting dataset."""
    return _make_cell_dino_model(arch_name="vit_small", patch_size=8, img_size=128, in_chans=in_channels,
                                 pretrained=pretrained, pretrained_path=pretrained_path,
                                 pretrained_url=pretrained_url, weights=weights, **kwargs)


def channel_adaptive_dino_vitl16(*, pretrained_url=None, pretrained_path=None, pretrained=True,
                                 weights=Weights.CELL_DINO, in_channels=1, channel_adaptive=True, **kwargs):
    """Channel-Adaptive DINO (bag of channels) ViT-L/16: one-channel backbone, channels encoded separately by
    get_intermediate_layers."""
    return _make_cell_dino_model(arch_name="vit_large", patch_size=16, img_size=224, in_chans=in_channels,
                                 pretrained=pretrained, pretrained_path=pretrained_path,
                                 pretrained_url=pretrained_url, weights=weights, channel_adaptive=channel_adaptive,
                                 **kwargs)


HUB_MODELS = {fn.__name__: fn for fn in (cell_dino_hpa_vitl16, cell_dino_hpa_vitl14, cell_dino_cp_vits8,
                                          channel_adaptive_dino_vitl16)}


# ---- export ---------------------------------------------------------------------------------------------------------

def export_backbone(source, output_dir, name, block_chunks=4, arch=None, **model_kwargs):
    """Write a backbone as `<name>.safetensors` (weights + model settings as metadata) and `<name>.pth` (reference
    hub format: a plain state dict with `blocks.<chunk>.<index>` keys for block_chunks > 0), atomically.

    source: a checkpoint path in any supported format (e.g. a training teacher_checkpoint.pth), or a
    DinoVisionTransformer. Returns {"safetensors": path, "pth": path}.
    """
    if isinstance(source, DinoVisionTransformer):
        model = source
        if model_kwargs or arch is not None:
            raise ValueError("export_backbone: arch/model kwargs only apply when source is a checkpoint path")
    else:
        model = load_backbone(source, arch=arch, **model_kwargs)
    state_dict = remap_block_keys(model.state_dict(), block_chunks, model.n_blocks)
    metadata = backbone_export_metadata(model, block_chunks=block_chunks)
    os.makedirs(output_dir, exist_ok=True)
    paths = {"safetensors": os.path.join(output_dir, f"{name}.safetensors"),
             "pth": os.path.join(output_dir, f"{name}.pth")}
    save_safetensors(state_dict, paths["safetensors"], metadata)
    save_pth(state_dict, paths["pth"])
    return paths


# ---- `celldino export` ----------------------------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="teacher_checkpoint.pth, a hub-format .pth, a state dict, a celldino .safetensors, "
                             "or a training checkpoint directory <output>/checkpoints/iter_<n>/ (its teacher)")
    parser.add_argument("--output-dir", required=True, help="directory for <name>.safetensors and <name>.pth")
    parser.add_argument("--name", default=None,
                        help="file name stem (default: celldino_<arch><patch>, e.g. celldino_vitl16; "
                             "celldino_vit<patch> for a custom width or depth)")
    parser.add_argument("--block-chunks", type=int, default=4,
                        help="block key layout of the outputs: 4 = the released hub format (blocks.C.I), "
                             "0 = unchunked (blocks.I) (default 4)")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS), help="override the inferred arch")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, needed only for non-standard widths/depths")
    parser.add_argument("--channel-adaptive", action="store_true",
                        help="record the model as a bag-of-channels (Channel-Adaptive DINO) backbone")
    parser.add_argument("--interpolate-offset", type=float, default=None,
                        help="pos-embed interpolation offset to record (default 0.1, as every released model)")
    parser.add_argument("--interpolate-antialias", action="store_true", help="record antialiased pos-embed "
                        "interpolation (default off, as every released model)")


def _default_name(model):
    short = {"vit_small": "vits", "vit_base": "vitb", "vit_large": "vitl", "vit_giant2": "vitg"}
    arch = arch_of(model.embed_dim, model.n_blocks, model.num_heads)
    return f"celldino_{short.get(arch, 'vit')}{model.patch_size}"


def main(args):
    kwargs = {}
    if args.num_heads is not None:
        kwargs["num_heads"] = args.num_heads
    if args.channel_adaptive:
        kwargs["channel_adaptive"] = True
    if args.interpolate_offset is not None:
        kwargs["interpolate_offset"] = args.interpolate_offset
    if args.interpolate_antialias:
        kwargs["interpolate_antialias"] = True
    try:
        model = load_backbone(args.checkpoint, arch=args.arch, **kwargs)
    except CheckpointError as exc:
        print(f"celldino export: {exc}", file=sys.stderr)
        return 1
    name = args.name or _default_name(model)
    paths = export_backbone(model, args.output_dir, name, block_chunks=args.block_chunks)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"exported {name}: {n_params / 1e6:.1f}M parameters, patch {model.patch_size}, "
          f"{model.config['in_chans']} channels, img_size {model.config['img_size']}, "
          f"block_chunks {args.block_chunks}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="export a trained teacher backbone")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
