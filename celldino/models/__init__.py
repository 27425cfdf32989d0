"""Cell-DINO / DINOv2 models: the ViT backbones, the DINO head and the builders used by training and evaluation."""
import logging

from .head import DINOHead, WeightNormLinear
from .vision_transformer import ARCHS, DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small

logger = logging.getLogger("celldino")

BUILDERS = {"vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large, "vit_giant2": vit_giant2}


def _get(args, name, default=None):
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def arch_builder(arch):
    """The builder for an arch name (the reference's "_memeff" suffix is accepted and ignored)."""
    name = str(arch).removesuffix("_memeff")
    if name not in BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[name]


def build_model(args, only_teacher=False, img_size=224):
    """Teacher and student backbones from a `student` config section (reference dinov2.models.build_model).

    The student gets drop_path_rate / drop_path_uniform, the teacher none; init_values = args.layerscale.
    celldino extension: args.embed_dim / depth / num_heads, when set (not None), override the arch's values.
    Returns (student, teacher, embed_dim), or (teacher, embed_dim) when only_teacher.
    """
    builder = arch_builder(_get(args, "arch"))
    vit_kwargs = dict(
        img_size=img_size,
        patch_size=_get(args, "patch_size"),
        init_values=_get(args, "layerscale"),
        ffn_layer=_get(args, "ffn_layer", "mlp"),
        block_chunks=_get(args, "block_chunks", 0),
        qkv_bias=_get(args, "qkv_bias", True),
        proj_bias=_get(args, "proj_bias", True),
        ffn_bias=_get(args, "ffn_bias", True),
        num_register_tokens=_get(args, "num_register_tokens", 0),
        interpolate_offset=_get(args, "interpolate_offset", 0.1),
        interpolate_antialias=_get(args, "interpolate_antialias", False),
        in_chans=_get(args, "in_chans", 3),
        channel_adaptive=_get(args, "channel_adaptive", False),
    )
    for key in ("embed_dim", "depth", "num_heads"):
        if _get(args, key) is not None:
            vit_kwargs[key] = _get(args, key)
    teacher = builder(**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = builder(**vit_kwargs, drop_path_rate=_get(args, "drop_path_rate", 0.0),
                      drop_path_uniform=_get(args, "drop_path_uniform", False))
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg, only_teacher=False):
    """Backbones from a full config: cfg.student, with img_size = cfg.crops.global_crops_size (as the reference)."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)


__all__ = ["DinoVisionTransformer", "DINOHead", "WeightNormLinear", "vit_small", "vit_base", "vit_large",
           "vit_giant2", "ARCHS", "BUILDERS", "arch_builder", "build_model", "build_model_from_cfg"]
