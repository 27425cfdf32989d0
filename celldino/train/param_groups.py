"""Parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay on bias / norm / LayerScale
(reference: dinov2/utils/param_groups.py)."""
import logging
import re
from collections import defaultdict

logger = logging.getLogger("celldino")

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
# blocks.<i>.* (plain) or blocks.<chunk>.<i>.* (block_chunks); <i> is the global block index in both
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:(\d+)\.)?")


def _block_index(name):
    match = _BLOCK_RE.search(name)
    if match is None:
        return None
    chunk_or_block, block_in_chunk = match.groups()
    return int(block_in_chunk) if block_in_chunk is not None else int(chunk_or_block)


def _count_blocks(model):
    indices = {_block_index(n) for n, _ in model.named_parameters()} - {None}
    return max(indices) + 1 if indices else 0


def _is_chunked(model):
    """True if block parameters are named blocks.<chunk>.<i>.* (the second field is a number)."""
    return any(re.search(r"(?:^|\.)blocks\.\d+\.\d+\.", n) for n, _ in model.named_parameters())


def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, is_backbone=True):
    """rate ** (num_layers + 1 - layer_id): embeddings have layer 0, block i layer i + 1, the rest num_layers + 1."""
    layer_id = num_layers + 1
    if is_backbone:
        if any(key in name for key in _EMBEDDING_NAMES):
            layer_id = 0
        elif "residual." not in name:
            index = _block_index(name)
            if index is not None:
                layer_id = index + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per trainable parameter: name, params, lr_multiplier, wd_multiplier, is_last_layer.

    A module without transformer blocks (a head) gets multiplier 1 everywhere, as in the reference."""
    n_blocks = _count_blocks(model)
    groups = []
    for name, param in model.named_parameters():
        for wrapper in ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module."):
            name = name.replace(wrapper, "")
        if not param.requires_grad:
            continue
        group = {
            "name": name,
            "params": param,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": get_vit_lr_decay_rate(name, lr_decay_rate, n_blocks, is_backbone=n_blocks > 0),
            "wd_multiplier": 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0,
        }
        if "patch_embed" in name:
            group["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(group)
    return groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """Merge groups that share (lr_multiplier, wd_multiplier, is_last_layer) so the optimizer has few groups."""
    fused = defaultdict(lambda: {"params": []})
    for group in all_params_groups:
        identifier = tuple(group[k] for k in keys)
        for k in keys:
            fused[identifier][k] = group[k]
        fused[identifier]["params"].append(group["params"])
    return list(fused.values())
