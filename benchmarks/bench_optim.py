"""The FSDP2 optimizer step: per-submodule gradient clipping and AdamW on DTensor parameters, torch's own DTensor
paths (the baseline) vs celldino's shard-local ones (celldino.train.optim), same parameters, same run.

Both do the same arithmetic (tested equal); the difference is host work: every DTensor op propagates shardings
over each of its tensors before running the local op, which is most of the optimizer's time when the step is
launch-bound. The parameters are the student's (backbone, DINO and iBOT heads) with the trainer's parameter
groups (layer-wise lr decay: one group per block), sharded per block with FSDP2 `fully_shard` on a 1-rank group
(the layout every rank of a multi-GPU run steps on; more ranks shrink each shard, not the number of ops).
Sizes: on a GPU the Cell-DINO ViT-L/16 recipe (fused AdamW, as the trainer); on CPU a ViT of ViT-L's depth and
width 64 (foreach AdamW), where nearly all of the time is host work: depth 4 by default (a smoke run),
`--optim-depth 24` for ViT-L's depth.

    python -m benchmarks.run_all optim [--optim-depth 24]
Providers: `torch_dtensor` (torch.optim.AdamW and clipping on DTensors; the baseline), `shard_local`.
Ops: `clip` (clipping of backbone, DINO head and iBOT head, as the trainer) and `adamw` (one optimizer step).
"""
import torch
from torch.distributed.tensor import DTensor

from . import common

CPU_MODEL = ["student.arch=vit_small", "student.embed_dim=64", "student.num_heads=2",
             "student.patch_size=8", "student.in_chans=4", "teacher.in_chans=4", "dino.head_n_prototypes=256",
             "ibot.head_n_prototypes=256", "dino.head_hidden_dim=128", "ibot.head_hidden_dim=128",
             "dino.head_bottleneck_dim=64", "ibot.head_bottleneck_dim=64", "student.block_chunks=0",
             "ibot.separate_head=true", "train.device=cpu"]


def add_arguments(parser):
    parser.add_argument("--optim-config", default="cell_dino/vitl16_hpaone", help="recipe benchmarked on a GPU")
    parser.add_argument("--optim-depth", type=int, default=None,
                        help="backbone depth (default: the recipe's on a GPU, 4 on CPU; 24 is ViT-L's)")


def _cfg(args, on_gpu):
    from celldino.config import load_config
    depth = getattr(args, "optim_depth", None)
    depth = [f"student.depth={depth}"] if depth else []
    if on_gpu and not getattr(args, "quick", False):
        return load_config(getattr(args, "optim_config", None) or "cell_dino/vitl16_hpaone", depth)
    return load_config(None, CPU_MODEL + (depth or ["student.depth=4"]))


def _sharded_student(cfg, device):
    """The SSLMetaArch of `cfg` whose student submodules (backbone, heads) are sharded on a 1-rank mesh, each block
    and each submodule an FSDP2 unit, with random DTensor gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from celldino.train.ssl_meta_arch import SSLMetaArch
    torch.manual_seed(0)
    with torch.device(device):
        model = SSLMetaArch(cfg)
    mesh = init_device_mesh(device.type, (1,))
    for module in model.student.values():
        for block in getattr(module, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
    for p in model.student.parameters():
        p.grad = DTensor.from_local(torch.randn_like(p.to_local()), p.device_mesh, p.placements)
    return model


def _providers(model, cfg, device):
    """[(name, {op: call})]: the baseline first."""
    from celldino.train import optim
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    betas = (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
    submodules = [list(m.parameters()) for m in model.student.values()]
    optimizers = {"torch_dtensor": torch.optim.AdamW(model.get_params_groups(), lr=0.0, betas=betas, **fused),
                  "shard_local": optim.build_optimizer(cfg, model.get_params_groups(), device)}
    assert type(optimizers["shard_local"]) is optim.ShardLocalAdamW
    clips = {"torch_dtensor": optim.clip_grad_norm_through_dtensor, "shard_local": optim.clip_grad_norm}
    providers = []
    for name, optimizer in optimizers.items():
        optim.apply_optim_scheduler(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
        clip = clips[name]
        providers.append((name, {"clip": lambda clip=clip: [clip(params, 3.0) for params in submodules],
                                 "adamw": optimizer.step}))
    return providers


def run(args):
    from celldino.train import distributed
    device = distributed.select_device("auto")  # cuda:<current> (a process group's device needs its index)
    cfg = _cfg(args, device.type == "cuda")
    _, _, created = distributed.init(device, single_process_group=True)
    try:
        with common.cpu_denormals_flushed(device):
            return _rows(cfg, device)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _rows(cfg, device):
    model = _sharded_student(cfg, device)
    params = list(model.student.parameters())
    providers = _providers(model, cfg, device)
    shape = (f"{cfg.student.arch} depth {len(model.student['backbone'].blocks)}: {len(params)} tensors, "
             f"{len(model.get_params_groups())} groups, {sum(p.numel() for p in params) / 1e6:.1f}M")
    rows = []
    for op in ("clip", "adamw"):
        rows += common.time_providers(
            f"optim {op} {shape}", [(name, calls[op]) for name, calls in providers], lambda fn: fn, device,
            bench_name="optim", op=op, shape=shape, dtype=torch.float32, mode="step", baseline="torch_dtensor",
            note="1-rank FSDP2 (fully_shard per block)")
    return rows
