"""Training metrics: the reference's training_metrics.json (JSON lines, 20-iteration window medians), throughput
(images/s, tokens/s, TFLOP/s, MFU against the torchtitan bf16 peak table), peak memory, TensorBoard, W&B and a
progress line.
"""
import json
import logging
import os
import resource
from collections import deque

import torch
from torch import nn

from celldino.files import atomic_write_text

logger = logging.getLogger("celldino")

# keys of the reference's training_metrics.json besides iteration / iter_time / data_time, in its order
REFERENCE_KEYS = ("lr", "wd", "mom", "last_layer_lr", "current_batch_size", "total_loss", "dino_local_crops_loss",
                  "dino_global_crops_loss", "koleo_loss", "ibot_loss")


class SmoothedValue:
    """Window (default 20, as the reference) and global statistics of a scalar series."""

    def __init__(self, window_size=20):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value, n=1):
        self.window.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def median(self):
        values = sorted(self.window)
        if not values:
            return float("nan")
        # torch.median semantics (the reference): the lower of the two middle values
        return values[(len(values) - 1) // 2]

    @property
    def avg(self):
        return sum(self.window) / len(self.window) if self.window else float("nan")

    @property
    def global_avg(self):
        return self.total / self.count if self.count else float("nan")


# ---- FLOPs -------------------------------------------------------------------------------------------------------

def _linear_flops_per_row(module):
    """2 x in x out for every Linear-like layer of `module` (multiply-adds x 2), per input row."""
    flops = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
        elif hasattr(m, "weight_v") and hasattr(m, "in_features"):  # the head's weight-normed prototypes
            flops += 2 * m.in_features * m.out_features
    return flops


def backbone_forward_flops(backbone, n_crops, image_size):
    """Forward FLOPs of the ViT on n_crops square crops: patch embedding, every block's Linear layers, attention
    (QK^T and AV: 4 N^2 D per crop) and nothing for norms / activations (the usual convention)."""
    patch = backbone.patch_size
    side = image_size // patch
    n_patches = side * side
    tokens = n_patches + 1 + backbone.num_register_tokens
    conv = backbone.patch_embed.proj
    patch_flops = 2 * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    blocks = list(backbone.iter_blocks())
    per_token = sum(_linear_flops_per_row(b) for b in blocks)
    attention = 4 * tokens * tokens * backbone.embed_dim * len(blocks)
    return n_crops * (n_patches * patch_flops + tokens * per_token + attention), n_crops * tokens


def ssl_step_flops(model, cfg, batch_size, n_masked):
    """Model FLOPs of one training step on one rank (student forward + backward = 3x forward, teacher forward),
    without the stochastic-depth savings; and the student token count. model: an SSLMetaArch."""
    n_local = cfg.crops.local_crops_number
    student = model.student
    g_flops, g_tokens = backbone_forward_flops(student.backbone, 2 * batch_size, cfg.crops.global_crops_size)
    l_flops, l_tokens = (backbone_forward_flops(student.backbone, n_local * batch_size, cfg.crops.local_crops_size)
                         if n_local else (0, 0))
    head_rows = (2 + n_local) * batch_size + (n_masked if model.do_ibot else 0)
    head = _linear_flops_per_row(student.dino_head) if "dino_head" in student else 0
    student_flops = g_flops + l_flops + head * head_rows
    if "ibot_head" in student:
        student_flops += _linear_flops_per_row(student.ibot_head) * n_masked
    teacher_flops = g_flops + head * (2 * batch_size + (n_masked if model.do_ibot else 0))
    return 3 * student_flops + teacher_flops, g_tokens + l_tokens


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- sinks ---------------------------------------------------------------------------------------------------------

class MetricsWriter:
    """training_metrics.json (main rank), TensorBoard (when installed) and W&B (when WANDB_* is set)."""

    def __init__(self, output_dir, cfg, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "training_metrics.json")
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except Exception as exc:  # tensorboard not installed: the JSON file is enough
            logger.info("TensorBoard logging off (%s)", exc)
        if any(k.startswith("WANDB_") for k in os.environ):
            try:
                import wandb
                from omegaconf import OmegaConf
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "celldino"), dir=output_dir,
                                        config=OmegaConf.to_container(cfg, resolve=True), resume="allow")
            except Exception as exc:
                logger.warning("W&B logging requested (WANDB_* set) but unavailable: %s", exc)

    def drop_from(self, iteration):
        """Resuming at `iteration`: remove the lines a previous run wrote for it and later (they were logged after
        its last checkpoint and are about to be computed again), so each iteration appears once. Atomic."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) >= iteration:
                    continue
            except ValueError:  # a line cut by a kill: dropped too
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))
            logger.info("training_metrics.json: dropped %d line(s) from iteration %d on (resuming there)",
                        len(lines) - len(kept), iteration)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["iteration"]
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """A tqdm bar on the main rank (a log line every period elsewhere / without tqdm)."""

    def __init__(self, start, total, enabled=True):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, desc="training", unit="it", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n, postfix=None):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
