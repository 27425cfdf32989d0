"""Optimizer, per-group schedule application and per-submodule gradient clipping (reference train.py semantics).

With FSDP2 the parameters and gradients are DTensors. AdamW and the clipping are elementwise (plus one sum for the
norm), so both run here on the local shards: the same arithmetic, without DTensor's per-op sharding propagation
(host time: `celldino bench optim`, docs/train.md)."""
import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw


def build_optimizer(cfg, params_groups, device):
    """AdamW over the fused parameter groups: fused=True on CUDA, foreach elsewhere (the reference: foreach);
    ShardLocalAdamW when the parameters are FSDP2 shards."""
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    for group in params_groups:
        group.pop("foreach", None)
        group.pop("fused", None)
    sharded = any(isinstance(p, DTensor) for group in params_groups for p in _as_list(group["params"]))
    optimizer_class = ShardLocalAdamW if sharded else torch.optim.AdamW
    return optimizer_class(params_groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), **kwargs)


def local_shard(tensor):
    """This rank's part of a DTensor, the DTensor's own local tensor (in-place updates reach the DTensor); other
    tensors as they are. For no-grad updates (optimizer, EMA, clipping). It reads `_local_tensor` rather than
    calling to_local(), which for a Parameter makes a new view on every call: ~2,500 calls per step at ViT-L
    depth, host time a launch-bound step waits for."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _as_list(params):
    return [params] if isinstance(params, torch.Tensor) else list(params)


class ShardLocalAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step runs torch's own AdamW update (torch.optim.adamw.adamw, fused / foreach as
    configured) on the local shards of DTensor parameters, gradients and moments. The state stays DTensors, laid
    out as torch.optim.AdamW lays it out, so state_dict, DCP checkpoints (any world size) and resume are unchanged;
    the updated values are the same (tested against torch.optim.AdamW on DTensors). amsgrad, differentiable steps
    and closures are not used by the trainer and refused."""

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("differentiable"):
            raise ValueError("ShardLocalAdamW supports neither amsgrad nor differentiable steps")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardLocalAdamW.step takes no closure")
        # grad_scale / found_inf: set by GradScaler.step for fused optimizers (_step_supports_amp_scaling), which
        # leaves unscaling and skipping a non-finite step to the fused kernel (it skips when found_inf is 1, then
        # subtracts found_inf from the step counters). ShardedGradScaler's found_inf (the trainer's with FSDP2) has
        # shape (1,), which torch's fused step cannot subtract from 0-dim counters (pytorch/pytorch#140514), and is
        # a sum over the ranks (2 and more when several ranks saw an inf): made a 0-dim 0 / 1 here.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None:
            found_inf = (found_inf.reshape(()) != 0).to(found_inf.dtype)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    _init_state(state, p, group)
                params.append(local_shard(p))
                grads.append(local_shard(p.grad))
                exp_avgs.append(local_shard(state["exp_avg"]))
                exp_avg_sqs.append(local_shard(state["exp_avg_sq"]))
                steps.append(state["step"])
            if params:
                beta1, beta2 = group["betas"]
                adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                      capturable=group["capturable"], differentiable=False, fused=group["fused"],
                      grad_scale=grad_scale, found_inf=found_inf, amsgrad=False, beta1=beta1, beta2=beta2,
                      lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


def _init_state(state, param, group):
    """The state torch.optim.AdamW creates for a parameter on its first step (step counter on the parameter's
    device for fused / capturable, else on the CPU; moments like the parameter: DTensors for DTensor parameters)."""
    on_device = group["capturable"] or group["fused"]
    scalar_dtype = torch.float32 if on_device or torch.get_default_dtype() != torch.float64 else torch.float64
    state["step"] = torch.zeros((), dtype=scalar_dtype, device=param.device if on_device else "cpu")
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr):
    """lr x lr_multiplier (last_layer_lr for the prototype layer), wd x wd_multiplier, per group."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ that also works on FSDP2 (DTensor) gradients: for gradients sharded alike
    (FSDP2's), the norms of the local shards are combined over the shard groups and the scaling runs on the shards;
    other DTensor layouts go through DTensor. Returns the total norm (a plain tensor, no host sync)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    groups = _shard_groups([p.grad for p in params])
    if groups is None:
        return clip_grad_norm_through_dtensor(params, max_norm)
    grads = [local_shard(p.grad) for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if groups:
        squares = total.float() ** 2 if total.dtype not in (torch.float32, torch.float64) else total ** 2
        for group in groups:
            torch.distributed.all_reduce(squares, group=group)
        total = squares.sqrt()
    # torch.nn.utils.clip_grads_with_norm_'s scaling, applied to the shards (it reads p.grad, the DTensors)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


def clip_grad_norm_through_dtensor(params, max_norm):
    """Clipping as torch runs it on any gradients, DTensors included (each op through DTensor's sharding
    propagation): clip_grad_norm's fallback, and the baseline of `celldino bench optim`. Returns the total norm."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _shard_groups(tensors):
    """For DTensors that share one mesh and one placement list of Shard / Replicate (FSDP2 / HSDP gradients): the
    process groups of the mesh dimensions they are sharded over ([] when none has more than one rank). None when the
    tensors are not DTensors laid out alike (the caller then goes through DTensor)."""
    first = tensors[0]
    if not isinstance(first, DTensor):
        return None
    mesh, placements = first.device_mesh, first.placements
    if any(not isinstance(t, DTensor) or t.device_mesh != mesh or t.placements != placements for t in tensors):
        return None
    if any(not (p.is_shard() or p.is_replicate()) for p in placements):
        return None
    return [mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard() and mesh.size(dim) > 1]
