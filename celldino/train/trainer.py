"""The Cell-DINO / DINOv2 training loop (reference: dinov2/train/train.py do_train), from one CPU process to many
GPUs.

    summary = run_training(cfg, output_dir, resume=True)

Output directory (as the reference, plus a few files): config.yaml (merged, with the scaled lr), logs/log.txt
(+ log.txt.rank<N>), training_metrics.json (JSON lines every train.log_period iterations: the reference keys plus
throughput), tensorboard/, checkpoints/iter_<it>/ (DCP), eval/training_<it>/teacher_checkpoint.pth (+ the backbone
as safetensors).

Per step: schedules -> teacher targets and student losses (SSLMetaArch.compute_losses) -> backward -> per-submodule
clipping -> AdamW -> teacher EMA. The loss values stay on the device and are reduced over ranks once every
log period (one all-reduce, one host sync), and before every checkpoint and teacher export: a NaN/inf loss on any
rank stops every rank before anything is written, so the last checkpoint is always a good one.
Every random draw of step i (augmentation, masks, stochastic depth) is seeded by (train.seed, rank, i), so a
resumed run continues exactly as an uninterrupted one.
"""
import contextlib
import copy
import logging
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from celldino.config import apply_scaling_rules_to_cfg, config_differences, save_config
from celldino.hardware import peak_tflops

from . import distributed
from .checkpointing import (TrainState, backbone_metadata, clean_partial_saves, export_teacher, load_latest,
                            save_checkpoint, set_aside_checkpoints)
from .data import augment_on_device, augmentation_mode, build_train_loader, derive_seed, open_train_dataset
from .metrics import MetricsWriter, Progress, SmoothedValue, peak_memory_mb, ssl_step_flops
from .optim import apply_optim_scheduler, build_optimizer
from .parallel import fsdp_setting, make_plan, parallelize, whole_number
from .schedules import EPOCH_KEYS, build_schedulers, iterations
from .ssl_meta_arch import SSLMetaArch

logger = logging.getLogger("celldino")

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


# FSDP2 warns on every forward that the backbone returns views (the output dict's CLS / patch slices); nothing
# updates them in place, so the hooks it registers stay valid
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or inf; nothing was saved after the last good checkpoint."""


# ---- set-up helpers ------------------------------------------------------------------------------------------------

def setup_logging(output_dir, rank):
    """logs/log.txt on rank 0, logs/log.txt.rank<N> on the others (reference layout); returns the handlers added."""
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / ("log.txt" if rank == 0 else f"log.txt.rank{rank}")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return [handler]


def prepare_config(cfg, output_dir, world_size):
    """A copy of cfg with train.output_dir and the scaled lr set (the reference's setup())."""
    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(output_dir)
    apply_scaling_rules_to_cfg(cfg, world_size=world_size)
    _check_config(cfg)
    return cfg


# settings that do not change what a resumed run computes (stop_after_iters is how runs are cut and resumed)
_RESUME_NEUTRAL_KEYS = ("train.output_dir", "train.stop_after_iters", "train.num_workers", "train.log_period")


def _report_config_changes(saved_path, cfg):
    """Say (log and console) which settings differ from the config saved by the previous run in this directory:
    resuming with another batch size or schedule length is allowed (as the reference) but changes the run."""
    if not saved_path.is_file():
        return
    try:
        changes = config_differences(OmegaConf.load(saved_path), cfg, ignore=_RESUME_NEUTRAL_KEYS)
    except Exception as exc:  # noqa: BLE001 - an unreadable old config must not stop the run
        logger.warning("could not compare with the previous %s: %s", saved_path, exc)
        return
    if changes:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        message = f"settings changed since the previous run in this directory: {listed}{more}"
        logger.warning(message)
        print(f"celldino train: {message}", file=sys.stderr, flush=True)


def _optional_int(cfg, key, minimum=1):
    value = cfg.train.get(key)
    if value is None or str(value).lower() in ("null", "none", ""):
        return None
    return whole_number(value, f"train.{key}", minimum)


def _check_config(cfg):
    if cfg.train.batch_size_per_gpu < 1:
        raise ValueError(f"train.batch_size_per_gpu must be >= 1, got {cfg.train.batch_size_per_gpu}")
    whole_number(cfg.train.OFFICIAL_EPOCH_LENGTH, "train.OFFICIAL_EPOCH_LENGTH")
    for key in EPOCH_KEYS:  # whole numbers of iterations (fractional epochs allowed when the product is whole)
        iterations(cfg, key)
    if iterations(cfg, "optim.epochs") < 1:
        raise ValueError("optim.epochs x train.OFFICIAL_EPOCH_LENGTH must be >= 1 iteration")
    if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"train.centering: expected centering or sinkhorn_knopp, got {cfg.train.centering!r}")
    for key in ("checkpoint_period", "stop_after_iters", "log_period"):
        _optional_int(cfg, key)
    for key in ("global_crops_size", "local_crops_size"):
        if cfg.crops[key] % cfg.student.patch_size:
            raise ValueError(f"crops.{key} {cfg.crops[key]} is not a multiple of student.patch_size "
                             f"{cfg.student.patch_size}")
    if cfg.student.get("channel_adaptive") and int(cfg.student.in_chans) != 1:
        raise ValueError(f"student.channel_adaptive=true needs student.in_chans=1 (one channel per image: bag of "
                         f"channels), got {cfg.student.in_chans}")
    _optional_int(cfg, "max_to_keep", minimum=0)  # 0 or null: keep all
    _warn_unused_differences(cfg)
    if str(cfg.MODEL.get("WEIGHTS") or ""):
        # the reference reads it only in train.py --eval-only; ignoring it silently would train from scratch
        raise ValueError(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} is not used by celldino train (the reference reads it "
                         "only with --eval-only): start from weights with student.pretrained_weights=PATH, or "
                         "evaluate them with celldino eval knn / linear --checkpoint PATH")
    if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        # KoLeo uses this rank's batch only (as the reference): one row is its own nearest neighbour, and the
        # reference optimises -log of a ~1e-8 distance there (about 15 in fp32, inf/NaN in fp16)
        raise ValueError("train.batch_size_per_gpu=1 with dino.koleo_loss_weight > 0: KoLeo needs at least 2 "
                         "images per rank to find nearest neighbours; use train.batch_size_per_gpu >= 2 or "
                         "dino.koleo_loss_weight=0")


def _warn_unused_differences(cfg):
    """Keys the reference reads nowhere but a user may expect to matter: say so when they disagree with the keys
    that do (the teacher is built from student.*; the iBOT head is the DINO head unless ibot.separate_head)."""
    for key in ("in_chans", "channel_adaptive"):
        if key in cfg.teacher and key in cfg.student and cfg.teacher[key] != cfg.student[key]:
            logger.warning("teacher.%s=%s differs from student.%s=%s: unused, the teacher is built from student.* "
                           "(as the reference)", key, cfg.teacher[key], key, cfg.student[key])
    if not cfg.ibot.separate_head:
        differing = [k for k in ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")
                     if k in cfg.ibot and cfg.ibot[k] != cfg.dino[k]]
        if differing:
            logger.warning("ibot.%s differ from dino.* but are unused: iBOT shares the DINO head unless "
                           "ibot.separate_head=true (as the reference)", ", ".join(differing))


# ---- the trainer ---------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg, output_dir, resume=True):
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _, _, local_rank = distributed.env_world()
        self.device = distributed.select_device(cfg.train.get("device", "auto"), local_rank)
        use_fsdp = fsdp_setting(cfg)
        processes = distributed.env_world()[1]
        if use_fsdp is False and processes > 1:
            raise ValueError(f"train.fsdp=false runs one process only; this launch has {processes} "
                             "(use train.fsdp=auto or true)")
        self.rank, self.world_size, self._owns_group = distributed.init(
            self.device, timeout_minutes=float(cfg.train.get("dist_timeout_minutes", 30)),
            single_process_group=use_fsdp is True)
        self.is_main = self.rank == 0
        self._log_handlers = setup_logging(self.output_dir, self.rank)
        distributed.check_shared_directory(self.output_dir)  # every rank must see rank 0's checkpoints
        self.writer = None
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, resume):
        self.cfg = cfg = prepare_config(cfg, self.output_dir, self.world_size)
        # bad settings fail here, before config.yaml is written (a corrected rerun would otherwise be told that
        # the settings of a run that never trained had changed) and before the model is built
        augmentation_mode(cfg, self.device)
        self.plan = make_plan(cfg, self.device,
                              distributed=distributed.is_initialized() and fsdp_setting(cfg) is not False)
        if self.is_main:
            if resume:
                _report_config_changes(self.output_dir / "config.yaml", cfg)
            save_config(cfg, self.output_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the reference
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(int(cfg.train.seed))  # identical initial weights on every rank
        model = SSLMetaArch(cfg)
        self.n_params = sum(p.numel() for p in model.student.backbone.parameters())
        self.model = parallelize(model, self.plan, self.device)
        self.model.train()
        self.optimizer = build_optimizer(cfg, self.model.get_params_groups(), self.device)
        self.scaler = None
        if self.plan.grad_scaler:
            if distributed.is_initialized():
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler()
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        (self.lr_schedule, self.wd_schedule, self.momentum_schedule, self.teacher_temp_schedule,
         self.last_layer_lr_schedule) = build_schedulers(cfg)
        epoch_length = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
        self.max_iter = iterations(cfg, "optim.epochs")  # the length of every schedule too
        self.checkpoint_period = _optional_int(cfg, "checkpoint_period") or 3 * epoch_length
        self.log_period = _optional_int(cfg, "log_period") or 10
        self.stop_after = _optional_int(cfg, "stop_after_iters")
        self.keep = _optional_int(cfg, "max_to_keep", minimum=0) or 0  # 0: keep all
        self.eval_period = int(cfg.evaluation.eval_period_iterations)
        self.state = TrainState(self.model, self.optimizer, self.scaler)

        if not resume and self.is_main:
            aside = set_aside_checkpoints(self.output_dir)
            if aside is not None:
                print(f"celldino train: starting over; the previous checkpoints are now in {aside}", flush=True)
        clean_partial_saves(self.output_dir)  # a barrier: every rank sees the same checkpoints/ after it
        self.start_iter = 0
        self.last_checkpoint = None
        self._saved_at = None  # iteration of this process's latest save (never saved twice)
        if resume:
            last, path = load_latest(self.output_dir, self.state)
            if last is not None:
                self.start_iter, self.last_checkpoint = last + 1, path
        self.writer = MetricsWriter(self.output_dir, cfg, enabled=self.is_main)
        self.writer.drop_from(self.start_iter)  # lines logged after the last checkpoint are computed again
        self._signal = None
        self._signal_reported = False
        self._previous_handlers = {}

    # ---- one step ----------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.autocast_dtype)

    def train_step(self, batch, iteration):
        """One optimisation step; returns the loss terms as one device tensor (no host sync)."""
        lr = self.lr_schedule[iteration]
        wd = self.wd_schedule[iteration]
        last_layer_lr = self.last_layer_lr_schedule[iteration]
        apply_optim_scheduler(self.optimizer, lr, wd, last_layer_lr)
        torch.manual_seed(derive_seed("step", self.cfg.train.seed, self.rank, iteration))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, terms = self.model.compute_losses(batch, self.teacher_temp_schedule[iteration])
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.grad_norm = None
        if self.cfg.optim.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norms = self.model.clip_gradients(self.cfg.optim.clip_grad)
            norms = [n.float() for n in norms.values() if n is not None]
            if self.scaler is None and norms:  # (the grad scaler skips non-finite steps by itself)
                self.grad_norm = torch.stack(norms).sum()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(self.momentum_schedule[iteration])
        self.loss_keys = [k for k in LOSS_KEYS if k in terms]
        return torch.stack([terms[k].float() for k in self.loss_keys])

    # ---- signals -------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        # only a flag: logging from a signal handler can land inside the main thread's own write to the log
        # (a reentrant BufferedWriter call), and the record is then dropped; _flush says it
        self._signal = signum

    def _install_signal_handlers(self):
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                return

    def _restore_signal_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    # ---- reduction / checks / logging ----------------------------------------------------------------------------

    def _flush(self, pending, meters):
        """Reduce the pending per-iteration losses over ranks (one all-reduce), stop on NaN/inf, update the
        meters; returns (per-iteration reduced loss rows, the stop signal any rank received or None). The signal
        travels by kind, so every rank (rank 0 requeues the SLURM job) learns which one arrived, wherever it did."""
        if self._signal is not None and not self._signal_reported:
            self._signal_reported = True
            logger.warning("received %s: will checkpoint and stop now", signal.Signals(self._signal).name)
        flags = torch.tensor([1.0 if self._signal == getattr(signal, name, None) else 0.0 for name in STOP_SIGNALS],
                             device=self.device)
        values = torch.stack([t for _, t, _ in pending]) if pending else flags.new_zeros((0, 0))
        buffer = torch.cat([values.flatten(), flags])
        distributed.all_reduce_sum(buffer)
        buffer = buffer.cpu()
        seen = [name for name, count in zip(STOP_SIGNALS, buffer[-len(STOP_SIGNALS):].tolist()) if count > 0]
        # a requeue signal wins over SIGTERM when ranks saw different ones
        stop = next((name for name in ("SIGUSR1", "SIGUSR2") if name in seen), seen[0] if seen else None)
        if not pending:
            return [], stop
        rows = (buffer[:-len(STOP_SIGNALS)].view_as(values) / self.world_size).tolist()
        out = []
        for (iteration, _, info), row in zip(pending, rows):
            row, grad_norm = row[:-1], row[-1]
            if not all(math.isfinite(v) for v in row) or not math.isfinite(grad_norm):
                terms = dict(zip(self.loss_keys, row), gradient_norm=grad_norm)
                good = f"{self.last_checkpoint}" if self.last_checkpoint else "none (no checkpoint was written yet)"
                raise TrainingDivergedError(
                    f"non-finite loss or gradient at iteration {iteration}: {terms} (averaged over {self.world_size} "
                    "ranks); "
                    f"training stopped on every rank before saving anything. Last good checkpoint: {good}. "
                    "Resuming will run into the same data; consider a lower optim.base_lr, a larger "
                    "train.batch_size_per_gpu or optim.adamw_beta2=0.99 (see docs/train.md).")
            record = dict(zip(self.loss_keys, row))
            record["total_loss"] = sum(row)
            info.update(record)
            for key, value in info.items():
                if key not in ("iteration", "data_time", "iter_time"):
                    meters.setdefault(key, SmoothedValue()).update(value)
            out.append((iteration, row))
        pending.clear()
        return out, stop

    def _log_record(self, iteration, meters):
        iter_time = meters["iter_time"].avg
        record = {"iteration": iteration, "iter_time": iter_time, "data_time": meters["data_time"].avg}
        for key in ("lr", "wd", "mom", "last_layer_lr", "current_batch_size", "total_loss", *self.loss_keys):
            if key in meters:
                record[key] = meters[key].median
        images = self.cfg.train.batch_size_per_gpu * self.world_size
        step_flops = meters["step_flops"].avg
        record["images_per_s"] = images / iter_time if iter_time > 0 else float("nan")
        record["tokens_per_s"] = meters["step_tokens"].avg * self.world_size / iter_time if iter_time > 0 else 0.0
        record["tflops_per_gpu"] = step_flops / iter_time / 1e12 if iter_time > 0 else 0.0
        peak = peak_tflops(self.device)
        record["mfu"] = record["tflops_per_gpu"] / peak if peak else None
        record["peak_memory_mb"] = peak_memory_mb(self.device)
        self.writer.write(record)
        return record

    # ---- checkpoints / exports -------------------------------------------------------------------------------------

    def save(self, iteration):
        # the teacher backbone's settings travel with the checkpoint, so `celldino export` can rebuild it from here
        meta = {"max_iter": self.max_iter,
                "teacher_backbone": backbone_metadata(self.model.teacher.backbone, self.cfg)}
        path = save_checkpoint(self.output_dir, iteration, self.state, keep=self.keep, extra_meta=meta)
        self.last_checkpoint, self._saved_at = path, iteration
        return path

    # ---- the loop ------------------------------------------------------------------------------------------------

    def run(self, data=None, dataset=None):
        """data: optional iterable of collated batches (each with an "iteration" key) replacing the configured
        dataset, for tests and benchmarks; dataset: the training dataset already opened (open_train_dataset)."""
        cfg = self.cfg
        if self.is_main:
            self._print_banner()
        summary = {"output_dir": str(self.output_dir), "start_iteration": self.start_iter,
                   "max_iter": self.max_iter, "teacher_exports": [], "loss_history": [], "stopped": "finished"}
        if self.start_iter >= self.max_iter:
            logger.info("nothing to do: training already finished (%d iterations)", self.max_iter)
            summary.update(end_iteration=self.start_iter, iterations_run=0,
                           checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
            return summary
        if data is None:
            dataset = dataset if dataset is not None else open_train_dataset(cfg)
            data = build_train_loader(cfg, self.start_iter, self.rank, self.world_size, dtype=self.plan.input_dtype,
                                      dataset=dataset, device=self.device)
        meters = {"iter_time": SmoothedValue(), "data_time": SmoothedValue()}
        flops_cache = {}
        pending = []
        progress = Progress(self.start_iter, self.max_iter, enabled=self.is_main)
        iteration = self.start_iter
        run_count = 0
        summary["last_metrics"] = None
        self._install_signal_handlers()
        data_iter = iter(data)
        try:
            tick = time.perf_counter()
            while iteration < self.max_iter:
                batch = augment_on_device(next(data_iter), self.device, self.plan.input_dtype)
                data_time = time.perf_counter() - tick
                if batch["iteration"] != iteration:
                    raise RuntimeError(f"data stream out of step: batch of iteration {batch['iteration']} "
                                       f"at iteration {iteration}")
                terms = self.train_step(batch, iteration)
                info = self._step_info(batch, iteration, flops_cache)
                # the gradient norm rides along with the losses to the finiteness check: an inf gradient under a
                # finite loss would otherwise put NaN weights into the next checkpoint
                health = self.grad_norm if self.grad_norm is not None else terms.new_zeros(())
                pending.append((iteration, torch.cat([terms, health.reshape(1).to(terms.dtype)]), info))
                now = time.perf_counter()
                meters["iter_time"].update(now - tick)
                meters["data_time"].update(data_time)
                progress.update(1)
                run_count += 1

                due = self._due(iteration, run_count)
                if any(due) and self._at_boundary(iteration, due, pending, meters, progress, summary):
                    iteration += 1
                    break
                iteration += 1
                tick = time.perf_counter()
        finally:
            self._restore_signal_handlers()
            progress.close()
            del data_iter
        rows, _ = self._flush(pending, meters)
        summary["loss_history"] += rows
        summary.update(end_iteration=iteration, iterations_run=run_count,
                       averages={k: m.global_avg for k, m in meters.items()})
        return self._finish_summary(summary, dataset)

    def _at_boundary(self, iteration, due, pending, meters, progress, summary):
        """After `iteration`: reduce the pending losses (and any stop signal) over ranks, then log, export and
        checkpoint as due. Returns True when the run stops here early (stop_after_iters or a signal)."""
        is_log, is_ckpt, is_export, is_stop = due
        rows, signalled = self._flush(pending, meters)
        summary["loss_history"] += rows
        if is_log:
            summary["last_metrics"] = self._log_record(iteration, meters)
            progress.update(0, f"loss {summary['last_metrics']['total_loss']:.3f}")
        if is_export:
            path = export_teacher(self.model, self.cfg, self.output_dir, f"training_{iteration}")
            if path is not None:
                summary["teacher_exports"].append(str(path))
        if (is_ckpt or is_stop or signalled) and self._saved_at != iteration:
            self.save(iteration)
        if not (is_stop or signalled) or iteration == self.max_iter - 1:  # (stopping after the last one: finished)
            return False
        summary["stopped"] = "stop_after_iters" if is_stop else "signal"
        if signalled:
            summary["signal"] = signalled
        return True

    def _print_banner(self):
        cfg = self.cfg
        sizes = [f"{k} {cfg.student.get(k)}" for k in ("embed_dim", "depth", "num_heads")
                 if cfg.student.get(k) is not None]  # overrides of the arch's own sizes
        arch = f"{cfg.student.arch}/{cfg.student.patch_size}" + (f" with {', '.join(sizes)}" if sizes else "")
        print(f"celldino train: {arch} ({self.n_params / 1e6:.1f} M backbone parameters), "
              f"{self.world_size} x {self.device.type}, {self.plan.student['backbone'].param_dtype}, "
              f"iterations {self.start_iter} -> {self.max_iter}; output {self.output_dir}", flush=True)

    def _step_info(self, batch, iteration, flops_cache):
        """The schedules' values and the model FLOPs / tokens of one step, for the meters."""
        batch_size = batch["collated_global_crops"].shape[0] // 2
        n_masked = int(batch["mask_indices_list"].shape[0])
        key = (batch_size, n_masked)
        if key not in flops_cache:  # walks the modules: once per distinct shape
            flops_cache[key] = ssl_step_flops(self.model, self.cfg, batch_size, n_masked)
        flops, tokens = flops_cache[key]
        return {"lr": self.lr_schedule[iteration], "wd": self.wd_schedule[iteration],
                "mom": self.momentum_schedule[iteration], "last_layer_lr": self.last_layer_lr_schedule[iteration],
                "current_batch_size": float(batch_size), "step_flops": float(flops), "step_tokens": float(tokens)}

    def _due(self, iteration, run_count):
        """(log, checkpoint, teacher export, stop_after_iters) due after `iteration`; the last one does all."""
        last = iteration == self.max_iter - 1
        is_log = iteration % self.log_period == 0 or last
        is_ckpt = (iteration + 1) % self.checkpoint_period == 0 or last
        is_export = (self.eval_period > 0 and (iteration + 1) % self.eval_period == 0) or last
        is_stop = self.stop_after is not None and run_count >= self.stop_after
        return is_log, is_ckpt, is_export, is_stop

    def _finish_summary(self, summary, dataset):
        summary["checkpoint"] = str(self.last_checkpoint) if self.last_checkpoint else None
        if summary["loss_history"]:
            it, row = summary["loss_history"][-1]
            summary["last_losses"] = {"iteration": it, **dict(zip(self.loss_keys, row)), "total_loss": sum(row)}
        skipped = getattr(dataset, "skipped", None)
        summary["skipped_items"] = int(skipped.value) if skipped is not None else 0  # this rank's (on_error=skip)
        if summary["skipped_items"]:
            logger.warning("%d unreadable items were skipped on this rank (on_error=skip)", summary["skipped_items"])
        return summary

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for handler in self._log_handlers:
            logger.removeHandler(handler)
            handler.close()
        self._log_handlers = []
        if self._owns_group:
            distributed.destroy()
            self._owns_group = False


def run_training(cfg, output_dir, resume=True, data=None):
    """Train with `cfg` (a merged config, e.g. from celldino.config.load_config) into output_dir; resumes from the
    newest checkpoint there unless resume=False. Returns a summary dict (iterations run, where it stopped and
    why, the last checkpoint, the teacher exports, the per-iteration losses, the last metrics line).
    data: optional iterable of collated batches to train on instead of cfg.train.dataset_path."""
    # the dataset first: a bad path or channel count fails in seconds, before any model or output is made
    dataset = open_train_dataset(cfg) if data is None else None
    trainer = None
    try:
        trainer = Trainer(cfg, output_dir, resume=resume)
        return trainer.run(data, dataset=dataset)
    except Exception as exc:
        if trainer is not None:  # into this rank's log too: on another node it is the only record of the cause
            from celldino.data.loaders import worker_error_message
            logger.error("training stopped on rank %d: %s", trainer.rank,
                         worker_error_message(exc) or f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
