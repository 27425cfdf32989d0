"""One rank of a multi-process CPU (gloo) training run, started by test_distributed.py with torchrun-style
environment variables. Writes <result>.rank<N>.json (with "done": true) once training has returned and the
process group is gone, so the parent can tell a completed rank from a failed one even if the process then aborts
at interpreter exit (seen with FSDP2 + gloo on CPU)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_batches(cfg, rank, world, n_iterations, seed=1234):
    """The same global batch of world x B images every run, split by sample over the ranks (crop-major inside a
    rank, as collate does): rank r gets samples [r B, (r + 1) B) of each global batch."""
    import torch
    B = cfg.train.batch_size_per_gpu
    C, G, L = cfg.student.in_chans, cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local = cfg.crops.local_crops_number
    side = G // cfg.student.patch_size
    for it in range(n_iterations):
        g = torch.Generator().manual_seed(seed + it)
        total = B * world
        glob = torch.randn(total, 2, C, G, G, generator=g)
        loc = torch.randn(total, n_local, C, L, L, generator=g)
        masks = torch.rand(total, 2, side * side, generator=g) < 0.3
        masks[:, 1] = False  # half of the global crops unmasked, as the reference's mask probability 0.5
        masks[:, 0, 0] = True  # every masked crop has at least one masked patch
        mine = slice(rank * B, (rank + 1) * B)
        glob, loc, masks = glob[mine], loc[mine], masks[mine]
        collated_masks = torch.cat([masks[:, 0], masks[:, 1]])
        counts = collated_masks.sum(-1, keepdim=True).clamp(min=1)
        yield {
            "collated_global_crops": torch.cat([glob[:, 0], glob[:, 1]]),
            "collated_local_crops": torch.cat([loc[:, j] for j in range(n_local)]),
            "collated_masks": collated_masks,
            "mask_indices_list": collated_masks.flatten().nonzero().flatten(),
            "masks_weight": (1.0 / counts).expand_as(collated_masks)[collated_masks],
            "upperbound": int(collated_masks.sum()),
            "n_masked_patches": torch.tensor([int(collated_masks.sum())]),
            "iteration": it,
        }


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch
    torch.set_num_threads(1)
    from train_helpers import tiny_cfg

    from celldino.train.trainer import Trainer, TrainingDivergedError
    if spec.get("nan_rank") == rank:  # poison this rank's loss at one iteration
        from celldino.train.ssl_meta_arch import SSLMetaArch
        original = SSLMetaArch.compute_losses

        def compute_losses(self, batch, teacher_temp):
            total, terms = original(self, batch, teacher_temp)
            if batch["iteration"] == spec["nan_iteration"]:
                terms = dict(terms, koleo_loss=terms["koleo_loss"] * float("inf"))
            return total, terms
        SSLMetaArch.compute_losses = compute_losses
    if spec.get("signal_rank") == rank:  # send this rank (only) a stop signal during one iteration
        import signal

        from celldino.train.ssl_meta_arch import SSLMetaArch
        original_losses = SSLMetaArch.compute_losses

        def signalled_losses(self, batch, teacher_temp):
            if batch["iteration"] == spec["signal_iteration"]:
                os.kill(os.getpid(), getattr(signal, spec["signal_name"]))
            return original_losses(self, batch, teacher_temp)
        SSLMetaArch.compute_losses = signalled_losses
    cfg = tiny_cfg(*spec["overrides"])
    trainer = Trainer(cfg, spec["output_dir"], resume=spec.get("resume", True))
    from torch.distributed.tensor import DTensor
    student = list(trainer.model.student.parameters())
    result = {"rank": rank, "world": world, "start_iteration": trainer.start_iter,
              "sharded": any(isinstance(p, DTensor) for p in student),
              # (replicas, shard size) of the student's device mesh: [world] for FSDP, [r, s] for HSDP
              "mesh_shape": list(student[0].device_mesh.shape) if isinstance(student[0], DTensor) else None,
              "placements": [type(p).__name__ for p in student[0].placements] if isinstance(student[0], DTensor) else None,
              # per student block: how many units it all-gathers ahead explicitly (train.fsdp_prefetch; FSDP2 internals)
              "forward_prefetch": [len(getattr(b._get_fsdp_state(), "_states_to_forward_prefetch", ()))
                                   for b in trainer.model.student.backbone.iter_blocks()
                                   if hasattr(b, "_get_fsdp_state")]}
    try:
        if spec.get("compare_teacher"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(trainer.model.teacher, options=StateDictOptions(full_state_dict=True))
            saved = torch.load(spec["compare_teacher"], weights_only=True)["teacher"]
            if rank == 0:
                result["teacher_equal"] = sorted(saved) == sorted(state) and all(
                    torch.equal(saved[k], state[k]) for k in saved)
        data = None
        if spec.get("synthetic"):
            data = synthetic_batches(trainer.cfg, rank, world, trainer.max_iter)
        try:
            summary = trainer.run(data)
        except TrainingDivergedError as exc:
            summary = {"loss_history": [], "end_iteration": None, "stopped": f"diverged: {exc}"}
    finally:
        trainer.close()
    result.update(loss_history=summary["loss_history"], end_iteration=summary["end_iteration"],
                  stopped=summary["stopped"], signal=summary.get("signal"), done=True)
    path = Path(f"{spec['result']}.rank{rank}.json")
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
