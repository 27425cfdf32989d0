"""Activation checkpointing -> per-block torch.compile -> FSDP2, in that order (torchtitan / DINOv3), in one place.

`parallelize(model, plan, device)` takes an SSLMetaArch on the CPU and returns it ready to train:
- activation checkpointing per transformer block of the student (none | full | selective: matmul and attention
  outputs saved, everything else recomputed), done by wrapping the block's forward so that parameter names and
  state-dict keys do not change;
- `block.compile(fullgraph=True)` per block (student and teacher), in place, names unchanged, and the DINO / iBOT
  cross-entropies compiled with dynamic row counts (`compile_cross_entropy`);
- FSDP2 `fully_shard` per block and at the root of each of student/teacher x {backbone, dino_head, ibot_head},
  with the MixedPrecisionPolicy and reshard behaviour (ZeRO-2 / ZeRO-3) of the plan; the packed multi-crop entry
  points (`forward_features_list`, `forward_features`) are registered as FSDP forward methods. The mesh is 1-D
  over every rank, or 2-D (replicate, shard) for HSDP (`train.fsdp_shard_size`, or the reference's hybrid /
  NO_SHARD strategies).
Without a process group (a single CPU process) the model is moved to the device and not sharded.
"""
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger("celldino")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
# reference sharding_strategy -> reshard_after_forward (FSDP1 SHARD_GRAD_OP is ZeRO-2, FULL_SHARD ZeRO-3)
RESHARD = {"SHARD_GRAD_OP": False, "FULL_SHARD": True, "NO_SHARD": False, "HYBRID_SHARD": True,
           "_HYBRID_SHARD_ZERO2": False, "zero2": False, "zero3": True}
# ... and -> over how many ranks each parameter is sharded (the rest of the world holds replicas): FSDP1's hybrid
# strategies shard within a node and replicate across nodes, NO_SHARD replicates everywhere (DDP)
SHARD_GROUP = {"HYBRID_SHARD": "node", "_HYBRID_SHARD_ZERO2": "node", "NO_SHARD": "none"}


@dataclass
class PrecisionPlan:
    """How one submodule (e.g. student dino_head) computes, reduces and shards."""
    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = False


@dataclass
class ParallelPlan:
    fsdp: bool = False
    compile: bool = False
    compile_mode: str = "default"
    activation_checkpointing: str = "none"
    fsdp_blocks_per_unit: int = 1                # blocks sharded together (fewer units: less per-module host work)
    fsdp_shard_size: int = None                  # ranks per shard group (HSDP when below the world size; None: all)
    fsdp_prefetch: int = 0                       # units whose all-gathers a unit issues ahead (0: FSDP2's implicit)
    autocast_dtype: torch.dtype = None          # plain (unsharded) runs in bf16/fp16: autocast instead of FSDP MP
    grad_scaler: bool = False
    student: dict = field(default_factory=dict)  # submodule name -> PrecisionPlan
    teacher: dict = field(default_factory=dict)
    input_dtype: torch.dtype = torch.float32


# torch.compile modes for the blocks: inductor's default; max-autotune(-no-cudagraphs) also times Triton GEMM
# templates that can fuse bias / GELU / LayerScale epilogues (minutes of tuning at start-up); reduce-overhead replays
# CUDA graphs (inductor skips them, with a log line, for graphs it cannot capture)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def _dtype(name):
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def _truthy(cfg, key, auto):
    """train.<key> as True / False, or `auto` for auto (or unset); anything else is an error naming the key."""
    value = cfg.train.get(key, "auto")
    if value is None or str(value).lower() == "auto":
        return auto
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"train.{key}: expected true, false or auto, got {value!r}")


def whole_number(value, key, minimum=1):
    """A config value that must be a whole number >= minimum, as an int; booleans, fractions and words are errors
    naming the key (int() would turn true into 1 and 2.5 into 2)."""
    try:
        number = None if isinstance(value, bool) or value is None else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number != int(number) or int(number) < minimum:
        raise ValueError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return int(number)


def fsdp_setting(cfg):
    """train.fsdp: True (FSDP2 even for one process, on a 1-rank group) / False (one process only, unsharded), or
    None for auto: FSDP2 when there are several processes, a lone process unsharded (on one H200 the 1-rank FSDP2
    step was 1.2x slower: its hooks and copies, docs/benchmarks.md)."""
    return _truthy(cfg, "fsdp", auto=None)


def _world_sizes():
    """(world size, processes per node) of this run (torchrun and submitit export LOCAL_WORLD_SIZE)."""
    from .distributed import world_size
    world = world_size()
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def fsdp_shard_size(cfg, world, local_world):
    """How many ranks shard each parameter (train.fsdp_shard_size); world // that many replicas hold a copy each
    and average their gradients (HSDP). auto: from the reference's sharding_strategy when compute_precision.sharding
    is auto (HYBRID_SHARD / _HYBRID_SHARD_ZERO2: the processes of one node, NO_SHARD: 1, else every rank), every
    rank otherwise."""
    value = cfg.train.get("fsdp_shard_size", "auto")
    if value is None or str(value).lower() == "auto":
        size = world
        if str(cfg.compute_precision.get("sharding", "auto")) == "auto":
            cp = cfg.compute_precision
            groups = {SHARD_GROUP.get(str(cp[role][name].sharding_strategy), "all")
                      for role in ("student", "teacher") for name in ("backbone", "dino_head", "ibot_head")}
            if len(groups) > 1:
                raise ValueError("compute_precision.{student,teacher}.*.sharding_strategy mix hybrid / NO_SHARD / "
                                 "sharded strategies; celldino shards every module over one device mesh: make them "
                                 "agree or set train.fsdp_shard_size")
            size = {"node": local_world, "none": 1, "all": world}[groups.pop()]
        where = f"the processes per node (LOCAL_WORLD_SIZE={local_world})"
    else:
        try:
            size = whole_number(value, "train.fsdp_shard_size")
        except ValueError:
            raise ValueError(f"train.fsdp_shard_size: expected auto or a number of ranks, got {value!r}") from None
        where = "train.fsdp_shard_size"
    if world % size:
        raise ValueError(f"{where}: {size} ranks per shard group do not divide the {world} processes of this run")
    return size


def make_plan(cfg, device, distributed):
    """The ParallelPlan of a config (compute_precision.* and train.* keys) on `device`.

    compute_precision.policy: auto (bf16 on GPU, fp32 on CPU) | bf16 (bf16 params, fp32 reduction) | fp32 |
    reference (the per-module fp16 settings of compute_precision.{student,teacher}.* with a grad scaler, for
    parity runs). compute_precision.sharding: auto (each module's reference sharding_strategy) | zero2 | zero3.
    """
    cp = cfg.compute_precision
    policy = str(cp.get("policy", "auto")).lower()
    if policy == "auto":
        policy = "bf16" if device.type == "cuda" else "fp32"
    if policy not in ("bf16", "fp32", "reference"):
        raise ValueError(f"compute_precision.policy: expected auto, bf16, fp32 or reference, got {policy!r}")
    if policy == "reference" and device.type != "cuda":
        raise ValueError("compute_precision.policy=reference (fp16 + grad scaler) needs a CUDA GPU")
    sharding = str(cp.get("sharding", "auto"))
    fsdp = distributed
    plan = ParallelPlan(fsdp=fsdp, grad_scaler=policy == "reference" and bool(cp.grad_scaler))
    plan.compile = _truthy(cfg, "compile", auto=device.type == "cuda")
    plan.compile_mode = str(cfg.train.get("compile_mode", "default"))
    if plan.compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {plan.compile_mode!r}")
    plan.fsdp_blocks_per_unit = whole_number(cfg.train.get("fsdp_blocks_per_unit", 1), "train.fsdp_blocks_per_unit")
    plan.fsdp_prefetch = whole_number(cfg.train.get("fsdp_prefetch", 0), "train.fsdp_prefetch", minimum=0)
    plan.activation_checkpointing = str(cfg.train.get("activation_checkpointing", "none")).lower()
    if plan.activation_checkpointing not in ("none", "full", "selective"):
        raise ValueError(f"train.activation_checkpointing: expected none, full or selective, "
                         f"got {plan.activation_checkpointing!r}")
    if fsdp:
        plan.fsdp_shard_size = fsdp_shard_size(cfg, *_world_sizes())
    for role in ("student", "teacher"):
        plans = {}
        for name in ("backbone", "dino_head", "ibot_head"):
            section = cp[role][name]
            reshard_key = sharding if sharding != "auto" else section.sharding_strategy
            if reshard_key not in RESHARD:
                raise ValueError(f"compute_precision.{role}.{name}.sharding_strategy: unknown {reshard_key!r} "
                                 f"(expected one of {sorted(RESHARD)})")
            reshard = RESHARD[reshard_key]
            if role == "teacher":
                reshard = True  # forward only: nothing to keep for a backward
            if policy == "reference":
                mp = section.mixed_precision
                if _dtype(mp.get("buffer_dtype", "fp32")) != torch.float32:
                    # FSDP2 never casts buffers (and the backbone and heads have none that FSDP would cast)
                    raise ValueError(f"compute_precision.{role}.{name}.mixed_precision.buffer_dtype: only fp32 is "
                                     f"supported (FSDP2 keeps buffers in fp32), got {mp.buffer_dtype!r}")
                plans[name] = PrecisionPlan(_dtype(mp.param_dtype), _dtype(mp.reduce_dtype), reshard)
            elif policy == "bf16":
                plans[name] = PrecisionPlan(torch.bfloat16, torch.float32, reshard)
            else:
                plans[name] = PrecisionPlan(torch.float32, torch.float32, reshard)
        setattr(plan, role, plans)
    compute = plan.student["backbone"].param_dtype
    plan.input_dtype = compute
    if not fsdp:
        if compute != torch.float32:
            plan.autocast_dtype = compute
        # one autocast dtype (or none) serves every module: per-module param dtypes need FSDP (several processes,
        # or train.fsdp=true), as the reference wraps each module
        others = {f"{role}.{name}": p.param_dtype for role in ("student", "teacher")
                  for name, p in getattr(plan, role).items() if p.param_dtype != compute}
        if others:
            raise ValueError(f"compute_precision.*.mixed_precision.param_dtype: one unsharded process computes every "
                             f"module in {compute} (student.backbone's), but {sorted(others)} ask for another dtype; "
                             "make them agree, or run sharded (train.fsdp=true)")
    return plan


# ---- activation checkpointing --------------------------------------------------------------------------------------

_SAVE_OPS = None


def _selective_policy():
    global _SAVE_OPS
    if _SAVE_OPS is None:
        aten = torch.ops.aten
        ops = [aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default]
        cudnn = getattr(aten, "_scaled_dot_product_cudnn_attention", None)
        if cudnn is not None:
            ops.append(cudnn.default)
        import celldino.kernels  # noqa: F401 - registers the multi-crop attention ops
        for name in ("multicrop_attention_fwd", "multicrop_attention_reference"):
            try:  # the packed attention's forward (Triton kernel or its torch twin): saved, never recomputed
                ops.append(getattr(torch.ops.celldino, name).default)
            except (AttributeError, RuntimeError):
                pass
        _SAVE_OPS = set(ops)
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def apply_activation_checkpointing(backbone, mode):
    """Wrap each block's forward in torch.utils.checkpoint (non-reentrant); module names are unchanged."""
    if mode == "none":
        return 0
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    context_fn = None
    if mode == "selective":
        policy = _selective_policy()
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    count = 0
    for block in backbone.iter_blocks():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)
        block.forward = forward
        count += 1
    return count


# ---- compile + FSDP ------------------------------------------------------------------------------------------------

def compile_blocks(backbone, mode="default"):
    for block in backbone.iter_blocks():
        block.compile(fullgraph=True, mode=None if mode == "default" else mode)


def _shard(module, plan, mesh, blocks=(), blocks_per_unit=1, prefetch=0):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    blocks = list(blocks)
    units = [blocks[i:i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    for i, unit in enumerate(units):
        # the last unit is all-gathered again right away by the backward: keep it (torchtitan)
        reshard = plan.reshard_after_forward and i < len(units) - 1
        fully_shard(unit[0] if len(unit) == 1 else unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=plan.reshard_after_forward)
    if prefetch:
        _explicit_prefetch([unit[0] for unit in units], prefetch)


def _explicit_prefetch(units, n):
    """Each unit issues the all-gathers of the next n units when its own forward starts (and of the previous n in
    the backward). FSDP2 otherwise issues a unit's all-gather when the host reaches that unit: on a host-bound step
    the host is not ahead of the GPU, so the gather would not overlap the previous unit's compute. (A grouped unit
    is driven by its first block.)"""
    for i, unit in enumerate(units):
        if units[i + 1:i + 1 + n]:
            unit.set_modules_to_forward_prefetch(units[i + 1:i + 1 + n])
        if units[max(0, i - n):i]:
            unit.set_modules_to_backward_prefetch(units[max(0, i - n):i][::-1])


def parallelize(model, plan, device, mesh=None):
    """Apply the plan to an SSLMetaArch (see module docstring); returns the model."""
    if plan.activation_checkpointing != "none":
        n = apply_activation_checkpointing(model.student.backbone, plan.activation_checkpointing)
        logger.info("activation checkpointing (%s) on %d student blocks", plan.activation_checkpointing, n)
    if plan.compile:
        compile_blocks(model.student.backbone, plan.compile_mode)
        compile_blocks(model.teacher.backbone, plan.compile_mode)
        for loss in (model.dino_loss, getattr(model, "ibot_patch_loss", None)):
            if loss is not None:
                loss.compile_cross_entropy()
        logger.info("torch.compile(fullgraph=True, mode=%s) per transformer block (student and teacher); the "
                    "DINO / iBOT cross-entropies compiled with dynamic shapes", plan.compile_mode)
    model.to(device)  # FSDP2 shards what is already on the mesh's device
    if not plan.fsdp:
        return model
    from torch.distributed.fsdp import register_fsdp_forward_method
    # torch >= 2.14 warns when a sharded module returns a view (the backbone's CLS / patch-token slices of its final
    # norm): an in-place op on such a view would skip FSDP's pre-backward hook. Nothing modifies them in place (the
    # heads and losses only read them; sharded runs give the unsharded losses and gradients, tested), so the
    # warning, printed by every rank, would only alarm
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if mesh is None:
        mesh = device_mesh(device, plan.fsdp_shard_size)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.student.modules()):
        raise NotImplementedError("batch norm in the heads is not supported with sharding (as the reference)")
    for role, plans in (("student", plan.student), ("teacher", plan.teacher)):
        modules = getattr(model, role)
        for name, module in modules.items():
            blocks = list(module.iter_blocks()) if name == "backbone" else []
            _shard(module, plans[name], mesh, blocks, plan.fsdp_blocks_per_unit, plan.fsdp_prefetch)
        register_fsdp_forward_method(modules.backbone, "forward_features_list")
        register_fsdp_forward_method(modules.backbone, "forward_features")
    # the losses' buffers (centers) stay replicated plain tensors
    replicas = mesh.size(0) if mesh.ndim == 2 else 1
    logger.info("FSDP2: student and teacher sharded per block over %d ranks%s (student backbone %s params, "
                "%s reduce, reshard after forward %s)", mesh.size(mesh.ndim - 1),
                f", {replicas} replicas (HSDP)" if replicas > 1 else "", plan.student["backbone"].param_dtype,
                plan.student["backbone"].reduce_dtype, plan.student["backbone"].reshard_after_forward)
    return model


def device_mesh(device, shard_size=None):
    """The data-parallel mesh: 1-D over every rank (FSDP), or 2-D (replicate, shard) when parameters are sharded
    over `shard_size` ranks and replicated across the world // shard_size groups (HSDP: FSDP2 reduce-scatters
    inside a group, then all-reduces across groups). Ranks r*shard_size .. (r+1)*shard_size-1 form a group, so
    with torchrun's node-major ranks a group of LOCAL_WORLD_SIZE is one node."""
    from torch.distributed.device_mesh import init_device_mesh
    world = torch.distributed.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
