"""Training checkpoints (torch.distributed.checkpoint) and teacher exports.

Layout under the output directory:
    checkpoints/iter_<iteration:08d>/    one DCP checkpoint (every rank writes its shards) + meta.json
    checkpoints/.tmp-iter_<...>/         a save in progress (ignored and cleaned up on resume)
    eval/training_<iteration>/teacher_checkpoint.pth         {"teacher": {"backbone.*", "dino_head.*"}}
    eval/training_<iteration>/teacher_backbone.safetensors   the teacher backbone + model settings (metadata)

Checkpoints are independent of the world size (DCP reshards on load: save on 4 ranks, resume on 2) and atomic: a
save goes to a temporary directory that is renamed once every rank has finished writing and meta.json is on disk,
so a kill during a save leaves the previous checkpoint usable. The newest `keep` checkpoints are kept.
`iteration` in meta.json is the last completed iteration (the reference's convention): training resumes at +1.
"""
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from celldino.files import atomic_torch_save
from celldino.models.checkpoint import (CHECKPOINT_DIR, DCP_STATE_KEY, ITER_DIR, backbone_export_metadata,
                                        dcp_single_process_quiet, exception_summary, is_complete_checkpoint_dir)

from . import distributed

logger = logging.getLogger("celldino")



class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them loads."""


class TrainState(Stateful):
    """What a checkpoint holds: the SSLMetaArch (student, teacher, loss centers), the optimizer, the grad scaler."""

    def __init__(self, model, optimizer, scaler=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler

    def state_dict(self):
        # the lagged center update of the last step is folded in now: the next step would apply it first
        # anyway, so this changes nothing and makes the saved centers complete
        for loss in (getattr(self.model, "dino_loss", None), getattr(self.model, "ibot_patch_loss", None)):
            if loss is not None:
                loss.apply_center_update()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state):
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def checkpoint_root(output_dir):
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first: [(iteration, path)]."""
    root = checkpoint_root(output_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = ITER_DIR.match(path.name)
            if match and is_complete_checkpoint_dir(path):
                found.append((int(match.group(1)), path))
    return sorted(found)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir, iteration, state, keep=3, extra_meta=None):
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = checkpoint_root(output_dir)
    name = f"iter_{iteration:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    start = time.time()
    if distributed.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    with dcp_single_process_quiet():
        dcp.save({DCP_STATE_KEY: state}, checkpoint_id=str(tmp), no_dist=not distributed.is_initialized())
    distributed.barrier()
    if distributed.is_main_process():
        meta = {"iteration": int(iteration), "world_size": distributed.world_size(), "time": time.time()}
        meta.update(extra_meta or {})
        meta_tmp = tmp / "meta.json.tmp"
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / "meta.json")
        _fsync_dir(tmp)
        if final.exists():  # the same iteration saved again (e.g. a rerun that stopped at the same point)
            trash = root / f".old-{name}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(output_dir)[:-keep] if keep and keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint saved: %s (%.1f s)", final, time.time() - start)
    distributed.barrier()
    return final


def set_aside_checkpoints(output_dir):
    """Starting over in a directory that holds checkpoints (--no-resume): rename checkpoints/ to
    checkpoints.replaced-<time>/ (training_metrics.json moves into it too) so the new run's checkpoints are not pruned against the old ones (keep-last-N would
    delete the new, lower-numbered ones first) nor resumed from later. Returns the new name, or None. Main process
    only; nothing is deleted."""
    root = checkpoint_root(output_dir)
    if not list_checkpoints(output_dir):
        return None
    aside = root.with_name(f"{CHECKPOINT_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while aside.exists():
        aside = root.with_name(f"{CHECKPOINT_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    os.replace(root, aside)
    metrics = Path(output_dir) / "training_metrics.json"
    if metrics.is_file():  # the previous run's metrics go with its checkpoints
        os.replace(metrics, aside / metrics.name)
    logger.warning("starting over (no resume): the previous run's checkpoints and metrics were moved to %s", aside)
    return aside


def clean_partial_saves(output_dir):
    """Remove what an interrupted save left behind. A save of an iteration that already existed moves the old copy
    to .old-iter_X before renaming the new one in: a kill between the two renames leaves .old-iter_X as the only
    complete copy under that name, so it is put back instead of removed."""
    root = checkpoint_root(output_dir)
    if distributed.is_main_process() and root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name.startswith(".old-") and not (root / path.name[len(".old-"):]).exists():
                logger.warning("restoring %s, moved aside by an interrupted save", path.name[len(".old-"):])
                os.replace(path, root / path.name[len(".old-"):])
            elif path.name.startswith((".tmp-", ".old-")):
                logger.warning("removing an interrupted checkpoint save: %s", path)
                shutil.rmtree(path, ignore_errors=True)
        for path in root.iterdir():
            if ITER_DIR.match(path.name) and not is_complete_checkpoint_dir(path):
                logger.error("ignoring incomplete checkpoint %s (no meta.json or .metadata)", path)
    distributed.barrier()


def load_latest(output_dir, state):
    """Load the newest complete checkpoint into `state`; returns (iteration, path) or (None, None).

    Collective: rank 0 picks the checkpoint and every rank loads the same one. A checkpoint that cannot be read
    is reported and the next older one is tried."""
    candidates = [str(p) for _, p in list_checkpoints(output_dir)] if distributed.is_main_process() else None
    candidates = distributed.broadcast_object(candidates)
    for path in reversed(candidates):
        try:
            with open(Path(path) / "meta.json") as f:
                meta = json.load(f)
            iteration = int(meta["iteration"])
        except Exception as exc:  # noqa: BLE001 - reported below, after every rank has looked
            problem = exception_summary(exc)
        else:
            problem = None
        # every rank takes the same branch (dcp.load is collective): one rank that cannot read it skips it for all
        if not distributed.all_true(problem is None):
            logger.error("cannot load checkpoint %s (%s); trying an older one", path,
                         problem or "another rank cannot read its meta.json: is the output directory shared?")
            continue
        try:
            with dcp_single_process_quiet():
                dcp.load({DCP_STATE_KEY: state}, checkpoint_id=path, no_dist=not distributed.is_initialized())
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's error is a BaseException
            logger.error("cannot load checkpoint %s (%s); trying an older one", path, exception_summary(exc))
            continue
        logger.info("resumed from %s (iteration %d, saved by %d ranks)", path, meta["iteration"],
                    meta.get("world_size", 1))
        return iteration, Path(path)
    if candidates:
        raise NoUsableCheckpointError(f"none of the checkpoints under {checkpoint_root(output_dir)} could be loaded "
                                      "(see logs/log.txt): move them aside, or start over with --no-resume")
    return None, None


# ---- teacher export ------------------------------------------------------------------------------------------------

def backbone_metadata(backbone, cfg):
    """The settings that rebuild `backbone` (safetensors export metadata; meta.json of every checkpoint)."""
    return backbone_export_metadata(backbone, source="celldino train", student_arch=str(cfg.student.arch))


def export_teacher(model, cfg, output_dir, tag):
    """Collective: gather the full teacher and write eval/<tag>/teacher_checkpoint.pth (reference layout) and
    teacher_backbone.safetensors (loadable by celldino.hub.load_backbone) from rank 0."""
    from celldino.models.checkpoint import save_safetensors
    state = get_model_state_dict(model.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.is_main_process():
        return None
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu() for k, v in state.items()}
    out = Path(output_dir) / "eval" / tag
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_torch_save({"teacher": state}, out / "teacher_checkpoint.pth")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    save_safetensors(backbone, out / "teacher_backbone.safetensors",
                     metadata=backbone_metadata(model.teacher.backbone, cfg))
    logger.info("teacher exported: %s", path)
    return path
