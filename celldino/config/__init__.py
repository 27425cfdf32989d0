"""Configs: the reference's defaults, shipped recipes, and `key=value` overrides (OmegaConf), as DINOv2 does.

    cfg = load_config("cell_dino/vitl16_hpaone", ["train.batch_size_per_gpu=8"])

A recipe is a name under `recipes/` ("demo", "cell_dino/vitl16_hpaone", "eval/cell_dino/vitl16_pretrain",
"ssl_default_config" for the bare defaults) or a path to a yaml file. Keys that the defaults do not define are an
error naming the key and the file, except a few keys the reference itself ignores (warned and dropped).
"""
import logging
import math
import os
import warnings
from pathlib import Path

import omegaconf
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from celldino.files import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"
# data/sample of the checkout this package runs from: recipes name bundled files as ${sample_data:<relative path>},
# so `celldino train --config-file demo` finds them from any working directory
SAMPLE_DATA_DIR = CONFIG_DIR.parent.parent / "data" / "sample"
if not OmegaConf.has_resolver("sample_data"):
    # omegaconf 2.4 renamed register_new_resolver (now deprecated) to register_resolver (2.3's deprecated old API)
    _new_api = tuple(int(v) for v in omegaconf.__version__.split(".")[:2]) >= (2, 4)
    _register = OmegaConf.register_resolver if _new_api else OmegaConf.register_new_resolver
    _register("sample_data", lambda relative: str(SAMPLE_DATA_DIR / relative))
RECIPES_DIR = CONFIG_DIR / "recipes"

# Keys found in reference config files that the reference code never reads.
IGNORED_REFERENCE_KEYS = {
    "train.channel_adaptive": "the reference ignores it too (it lives under `train`); bag-of-channels features "
                              "are selected with student.channel_adaptive",
}

logger = logging.getLogger("celldino")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and where it came from."""


def list_recipes():
    """Recipe names addressable by `--config-file NAME`."""
    names = ["ssl_default_config"]
    names += sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    return names


def recipe_path(name_or_path):
    """Resolve a recipe name or a path to an existing yaml file."""
    text = str(name_or_path)
    if text in ("ssl_default_config", "defaults"):
        return DEFAULTS_FILE
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return path
    stem = text[:-5] if text.endswith(".yaml") else text
    candidate = RECIPES_DIR / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"config file {text!r} is neither an existing file nor a recipe name; "
                      f"recipes: {', '.join(list_recipes())}")


def _flat_keys(node, prefix=""):
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _flat_keys(node[key], f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def _drop_ignored(cfg, source):
    for key, why in IGNORED_REFERENCE_KEYS.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            warnings.warn(f"{source}: ignoring `{key}`: {why}")
            del node[leaf]
    return cfg


def _merge_checked(base, extra, source):
    """Merge `extra` into `base`, refusing keys that `base` does not define."""
    extra = _drop_ignored(extra, source)
    known = set(_flat_keys(base))
    for key in _flat_keys(extra):
        if key not in known:
            # a key whose prefix is a leaf in `base` (or absent) is unknown
            raise ConfigError(f"{source}: unknown config key `{key}` (not in {DEFAULTS_FILE.name}); "
                              "check the spelling against the defaults")
        _check_value_type(base, extra, key, source)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, extra)
    except ConfigKeyError as exc:  # pragma: no cover - caught above, kept as a safety net
        raise ConfigError(f"{source}: {exc}") from exc


def _check_value_type(base, extra, key, source):
    """A number or a boolean in the defaults must stay one (`train.batch_size_per_gpu=eight` is refused here, naming
    the key, instead of failing later inside the trainer); null is always allowed."""
    old, new = OmegaConf.select(base, key), OmegaConf.select(extra, key)
    if old is None or new is None:
        return
    if isinstance(old, bool):
        ok, expected = isinstance(new, bool), "true or false"
    elif isinstance(old, (int, float)):
        ok, expected = isinstance(new, (int, float)) and not isinstance(new, bool), "a number"
    else:
        return
    if not ok:
        raise ConfigError(f"{source}: `{key}` is {new!r}; expected {expected} (like {old!r})")


def _parse_overrides(overrides):
    items = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        items.append(item)
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from exc


def load_config(config_file=None, overrides=()):
    """defaults <- recipe/file <- `key=value` overrides, each checked against the defaults' keys."""
    cfg = OmegaConf.load(DEFAULTS_FILE)
    if config_file is not None:
        path = recipe_path(config_file)
        if path != DEFAULTS_FILE:
            try:
                file_cfg = OmegaConf.load(path)
            except Exception as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            if file_cfg is None:
                file_cfg = OmegaConf.create({})
            cfg = _merge_checked(cfg, file_cfg, str(path))
    cfg = _merge_checked(cfg, _parse_overrides(overrides), "command-line override")
    OmegaConf.set_struct(cfg, False)
    return cfg


def apply_scaling_rules_to_cfg(cfg, world_size=1):
    """Set optim.lr from optim.base_lr by the scaling rule (reference: sqrt_wrt_1024)."""
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        cfg.optim.lr = cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu * world_size / 1024.0)
        logger.info("sqrt scaling learning rate; base: %s, new: %s", cfg.optim.base_lr, cfg.optim.lr)
    elif rule == "linear_wrt_1024":
        cfg.optim.lr = cfg.optim.base_lr * cfg.train.batch_size_per_gpu * world_size / 1024.0
    elif rule in (None, "none"):
        cfg.optim.lr = cfg.optim.base_lr
    else:
        raise ConfigError(f"optim.scaling_rule: unknown rule {rule!r} (sqrt_wrt_1024, linear_wrt_1024, none)")
    return cfg


def config_differences(old, new, ignore=("train.output_dir",)):
    """[(key, old value, new value)] for the leaf keys whose values differ between two configs (a key only one
    of them has counts, with None on the other side)."""
    def flat(cfg):
        values = OmegaConf.to_container(cfg, resolve=True)  # interpolations (${sample_data:...}) resolved
        out = {}
        for key in _flat_keys(cfg):
            node = values
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def save_config(cfg, path):
    """Write the merged config atomically (temp file + rename)."""
    return Path(atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True)))
