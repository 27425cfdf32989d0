"""Optimizer, per-group schedule application and per-submodule gradient clipping (reference train.py semantics)."""
import torch
from torch.distributed.tensor import DTensor


def build_optimizer(cfg, params_groups, device):
    """AdamW over the fused parameter groups: fused=True on CUDA, foreach elsewhere (the reference: foreach)."""
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    for group in params_groups:
        group.pop("foreach", None)
        group.pop("fused", None)
    return torch.optim.AdamW(params_groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), **kwargs)


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr):
    """lr x lr_multiplier (last_layer_lr for the prototype layer), wd x wd_multiplier, per group."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ that also works on FSDP2 (DTensor) gradients: the total norm is reduced
    over the shards first. Returns the total norm (a tensor, no host sync)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
