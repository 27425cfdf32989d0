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


EPOCH_KEYS = ("optim.epochs", "optim.warmup_epochs", "teacher.warmup_teacher_temp_epochs",
              "optim.freeze_last_layer_epochs")


def iterations(cfg, epochs_key):
    """`epochs_key` x train.OFFICIAL_EPOCH_LENGTH as a whole number of iterations. Epochs may be fractional (2.5
    epochs of 10 iterations = 25), but a product that is not whole is an error naming both keys: the run length
    and every schedule must agree (a truncated run length once cut the run short of its schedules' end)."""
    section, key = epochs_key.split(".")
    value = float(cfg[section][key]) * float(cfg.train.OFFICIAL_EPOCH_LENGTH)
    if value < 0 or abs(value - round(value)) > 1e-6:
        raise ValueError(f"{epochs_key}={cfg[section][key]} x train.OFFICIAL_EPOCH_LENGTH="
                         f"{cfg.train.OFFICIAL_EPOCH_LENGTH} is {value:g} iterations: expected a whole number >= 0")
    return int(round(value))


def build_schedulers(cfg):
    """(lr, wd, momentum, teacher_temp, last_layer_lr) schedules from a merged config, as the reference."""
    total = iterations(cfg, "optim.epochs")
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=iterations(cfg, "optim.warmup_epochs"), start_warmup_value=0)
    lr_schedule = CosineScheduler(**lr)
    wd_schedule = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    momentum_schedule = CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total)
    temp_iters = iterations(cfg, "teacher.warmup_teacher_temp_epochs")
    teacher_temp_schedule = CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, temp_iters,
                                            warmup_iters=temp_iters,
                                            start_warmup_value=cfg.teacher.warmup_teacher_temp)
    last_layer_lr_schedule = CosineScheduler(**lr)
    last_layer_lr_schedule.schedule[: iterations(cfg, "optim.freeze_last_layer_epochs")] = 0
    return lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule
