"""What an eval config (`--config-file`, e.g. `eval/cell_dino/vitl16_pretrain`) says about the backbone.

The reference builds the eval model from the config's `student.*` and loads the teacher weights into it; celldino
builds it from the weights (`celldino.hub.load_backbone`). So the config is used in three ways:
- the settings the weights cannot tell (channel_adaptive, interpolate_offset, interpolate_antialias; num_heads of a
  non-standard width) become `load_backbone` kwargs: `backbone_kwargs_from_config`; a num_heads the file records
  (celldino exports, training meta.json) wins, and a config that disagrees with it is refused:
  `check_num_heads_matches_record`;
- what the weights do tell (in_chans, patch_size, arch / embed_dim / depth, num_register_tokens) is checked against
  the config: `check_backbone_matches_config`, an error naming the key and both values;
- the eval autocast dtype is compute_precision.teacher.backbone.mixed_precision.param_dtype (§1.4):
  `autocast_dtype_from_config`.
"""
from __future__ import annotations

from celldino.models import ARCHS
from celldino.models.vision_transformer import arch_of

PARAM_DTYPE_KEY = "compute_precision.teacher.backbone.mixed_precision.param_dtype"


class ConfigMismatchError(ValueError):
    """The weights disagree with the eval config; the message names the config key and both values."""


def load_eval_config(config_file, overrides=()):
    """The merged config (defaults <- file <- `key=value` overrides); ConfigError (a ValueError) when unusable."""
    from celldino.config import load_config

    cfg = load_config(config_file, list(overrides or ()))
    if cfg.student.channel_adaptive and int(cfg.student.in_chans) != 1:
        # the model reshapes [B, C, H, W] to C one-channel images: a wider patch embedding cannot take them
        raise ConfigMismatchError(f"student.channel_adaptive is true but student.in_chans is {cfg.student.in_chans}; "
                                  "a channel-adaptive backbone encodes one channel at a time (in_chans 1)")
    autocast_dtype_from_config(cfg)  # a bad dtype is a config error now, not a traceback later (and also on CPU)
    return cfg


def backbone_kwargs_from_config(cfg) -> dict:
    """The `load_backbone` kwargs an eval config fixes: the settings the weights cannot tell."""
    student = cfg.student
    kwargs = dict(channel_adaptive=bool(student.channel_adaptive),
                  interpolate_offset=float(student.interpolate_offset),
                  interpolate_antialias=bool(student.interpolate_antialias))
    if student.get("num_heads") is not None:  # a non-standard width (celldino demo configs): the weights cannot tell
        kwargs["num_heads"] = int(student.num_heads)
    return kwargs


def expected_backbone_shape(cfg) -> dict:
    """{config key: value} of what the weights determine, as the config says it: the arch's width and depth
    unless student.embed_dim / student.depth override them (celldino's small demo models)."""
    student = cfg.student
    arch = str(student.arch).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ConfigMismatchError(f"student.arch is {student.arch!r}; expected one of {sorted(ARCHS)}")
    expected = {"student.in_chans": int(student.in_chans), "student.patch_size": int(student.patch_size),
                "student.num_register_tokens": int(student.num_register_tokens)}
    for dim in ("embed_dim", "depth"):
        override = student.get(dim)
        expected[f"student.{dim}"] = int(override) if override is not None else ARCHS[arch][dim]
    return expected


def backbone_shape(model) -> dict:
    """The same keys for a loaded backbone: what its weights said."""
    config = getattr(model, "config", None) or {}
    return {"student.in_chans": int(config.get("in_chans", model.patch_embed.proj.in_channels)),
            "student.patch_size": int(model.patch_size),
            "student.num_register_tokens": int(model.num_register_tokens),
            "student.embed_dim": int(model.embed_dim), "student.depth": int(model.n_blocks)}


def _dims(values, keys):
    return ", ".join(f"{k.split('.')[1]} {values[k]}" for k in keys)


def _mismatches(expected, actual, student, config_name, source, check_arch):
    """One line per disagreeing key; a width / depth that comes from the arch name is reported as student.arch."""
    from_arch = [k for k in ("student.embed_dim", "student.depth") if student.get(k.split(".")[1]) is None]
    skipped = set() if check_arch else {"student.embed_dim", "student.depth"}
    problems = [f"{key} is {expected[key]} in {config_name} but {actual[key]} in {source}"
                for key in expected if key not in skipped | set(from_arch) and expected[key] != actual[key]]
    if check_arch and any(expected[k] != actual[k] for k in from_arch):
        weights_arch = arch_of(actual["student.embed_dim"], actual["student.depth"]) or "a custom size"
        problems.append(f"student.arch is {student.arch} in {config_name} ({_dims(expected, from_arch)}) but "
                        f"{_dims(actual, from_arch)} ({weights_arch}) in {source}")
    return problems


def check_backbone_matches_config(model, cfg, source="the weights", config_name="the config", check_arch=True):
    """Raise ConfigMismatchError naming each key where the weights disagree with the config, with both values.
    check_arch=False (an explicit --arch replaced the config's): the width and depth are not compared."""
    problems = _mismatches(expected_backbone_shape(cfg), backbone_shape(model), cfg.student, config_name, source,
                           check_arch)
    if problems:
        raise ConfigMismatchError("the weights do not match the config: " + "; ".join(problems) +
                                  " (pass the config the model was trained with)")


def check_num_heads_matches_record(recorded, cfg, source="the weights", config_name="the config"):
    """Raise ConfigMismatchError when the config's student.num_heads differs from the head count the checkpoint
    records. Why: the weight shapes do not depend on num_heads, so the other value would load without complaint and
    compute different features."""
    configured = cfg.student.get("num_heads")
    if configured is not None and recorded is not None and int(configured) != int(recorded):
        raise ConfigMismatchError(f"the weights do not match the config: student.num_heads is {configured} in "
                                  f"{config_name} but {recorded} in {source} (pass the config the model was trained "
                                  "with)")


def autocast_dtype_from_config(cfg) -> str:
    """The reference's eval autocast dtype: the teacher backbone's param_dtype, as fp16 | bf16 | fp32."""
    import torch
    from omegaconf import OmegaConf

    from .features import parse_dtype  # the one table of dtype names evaluation accepts

    value = OmegaConf.select(cfg, PARAM_DTYPE_KEY)
    try:
        dtype = parse_dtype(str(value))
    except ValueError:
        raise ConfigMismatchError(f"{PARAM_DTYPE_KEY} is {value!r}; expected fp16, bf16 or fp32") from None
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
