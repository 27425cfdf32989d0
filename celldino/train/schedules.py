"""Schedules of the reference trainer (dinov2/utils/utils.py CosineScheduler, train.py build_schedulers)."""
import numpy as np


class CosineScheduler:
    """freeze (zeros) -> linear warmup from start_warmup_value to base_value -> cosine to final_value.

    `schedule[it]` for it < total_iters, `final_value` afterwards. As in the reference, the linear warmup ends *on*
    base_value and the cosine starts there too, so the peak is held for two iterations.
    """

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed "
                             f"total_iters ({total_iters})")
        self.final_value = final_value
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        n_cosine = total_iters - warmup_iters - freeze_iters
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine))

    def __getitem__(self, it):
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self):
        return self.total_iters


def build_schedulers(cfg):
    """(lr, wd, momentum, teacher_temp, last_layer_lr) schedules from a merged config, as the reference."""
    epoch_length = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch_length
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=cfg.optim.warmup_epochs * epoch_length, start_warmup_value=0)
    lr_schedule = CosineScheduler(**lr)
    wd_schedule = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    momentum_schedule = CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total)
    temp_iters = cfg.teacher.warmup_teacher_temp_epochs * epoch_length
    teacher_temp_schedule = CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, temp_iters,
                                            warmup_iters=temp_iters,
                                            start_warmup_value=cfg.teacher.warmup_teacher_temp)
    last_layer_lr_schedule = CosineScheduler(**lr)
    last_layer_lr_schedule.schedule[: cfg.optim.freeze_last_layer_epochs * epoch_length] = 0
    return lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule
