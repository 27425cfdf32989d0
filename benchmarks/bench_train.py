"""End-to-end training step: the celldino trainer vs a reference-style trainer, same model, data, device and run.

Providers (same architecture and initial weights, same pre-collated batch already on the device, so the data
pipeline is not measured here: see bench_data):
- `celldino`: `Trainer.train_step` as `celldino train` runs it in one process: unsharded, bf16 autocast and
  per-block torch.compile on a GPU (fp32, eager on CPU; `--train-variant fsdp=train.fsdp=true` adds the 1-rank
  FSDP2 step with bf16 params / fp32 reduction that multi-GPU runs take); all crops in one packed token stream with
  the fused multi-crop attention, heads on one concatenated buffer, fused losses / KoLeo / Sinkhorn kernels, fused AdamW,
  foreach EMA, no host sync in the step.
- `reference-style` (the baseline): built here the way the reference runs without xFormers: eager, no compile,
  fp16 autocast + GradScaler on a GPU, fp32 master weights; global and local crops through the backbone in
  separate calls (one SDPA per crop-shape group), the DINO head called separately on the local CLS, global CLS
  and masked patches, plain-torch losses (loops over crop pairs, reference KoLeo), foreach AdamW (the reference's
  setting), per-submodule clipping, foreach EMA.
Sizes: on a GPU the Cell-DINO ViT-L/16 recipe (cell_dino/vitl16_hpaone: 4 channels, 2 x 224 + 8 x 96 crops,
65,536 prototypes, drop path 0.1) at batch 16 and 32 per GPU (--train-batch); on CPU a tiny ViT (< 1 min).
Rows: median / p20 / p80 ms per step, images/s, achieved TFLOP/s (model FLOPs: student 3x forward + teacher
forward, no stochastic-depth savings), MFU vs the bf16 peak table in the note, peak memory, speed-up vs the
reference-style step.

    python -m benchmarks.run_all train [--train-batch 16 32 64] [--train-steps 20] [--train-profile DIR]

--train-profile DIR: after each provider's timed steps (so the rows are unchanged), a few more steps under
torch.profiler, written per provider and batch size into DIR (trace, top-40 table, category breakdown CSV) with
one summary line each: see `step_profile.py`.
"""
import contextlib
import math
import shutil
import sys
import tempfile
import traceback

import torch
import torch.nn.functional as F

from celldino.hardware import peak_tflops

from . import common, step_profile, train_e2e

TINY = ["student.arch=vit_small", "student.embed_dim=64", "student.depth=2", "student.num_heads=2",
        "student.patch_size=8", "student.in_chans=4", "teacher.in_chans=4", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=4", "dino.head_n_prototypes=256",
        "ibot.head_n_prototypes=256", "dino.head_hidden_dim=128", "ibot.head_hidden_dim=128",
        "dino.head_bottleneck_dim=64", "ibot.head_bottleneck_dim=64", "student.block_chunks=0"]


def add_arguments(parser):
    parser.add_argument("--train-batch", type=int, nargs="*", default=None,
                        help="per-GPU batch sizes (GPU default: 16 32)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per provider (GPU 20, CPU 3)")
    parser.add_argument("--train-config", default="cell_dino/vitl16_hpaone", help="recipe benchmarked on a GPU")
    parser.add_argument("--train-profile", metavar="DIR", default=None,
                        help="after timing, profile a few more steps per provider and batch size into DIR "
                             "(<provider>_B<batch>_trace.json.gz, _top.txt, _breakdown.csv)")
    parser.add_argument("--train-profile-steps", type=int, default=3, help="profiled steps (after 1 warm-up)")
    parser.add_argument("--train-profile-trace-mb", type=float, default=10.0,
                        help="skip writing a trace over this many MB gzipped (0 = no limit)")
    parser.add_argument("--train-e2e-steps", type=int, default=None,
                        help="end-to-end rows (data pipeline + step, train_e2e.py): timed steps per provider "
                             "(GPU 12, CPU 2; 0 = skip)")
    parser.add_argument("--train-e2e-workers", type=int, default=None,
                        help="DataLoader workers of every end-to-end provider (GPU: min(10, cores - 2); CPU 0)")
    parser.add_argument("--train-e2e-fields", type=int, default=None, help="TIFF fields written (GPU 128, CPU 8)")
    parser.add_argument("--train-e2e-size", type=int, default=None, help="field side in pixels (GPU 512, CPU 64)")
    parser.add_argument("--train-overrides", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="config overrides for every provider of the run (e.g. train.fsdp=true to time the "
                             "1-rank FSDP2 step as the run's first trainer); named in each row's note")
    parser.add_argument("--train-variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="also time the celldino trainer with these config overrides, as provider "
                             "celldino[NAME] in the same run (repeatable), e.g. nofsdp=train.fsdp=false")


def parse_variant(text):
    """'NAME=KEY=VALUE[,KEY=VALUE...]' -> (NAME, [KEY=VALUE, ...])."""
    name, sep, rest = text.partition("=")
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides):
        raise ValueError(f"--train-variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name.strip(), overrides


def _run_overrides(args):
    """--train-overrides as a list (checked like a variant's)."""
    text = getattr(args, "train_overrides", "") or ""
    return parse_variant(f"run={text}")[1] if text.strip() else []


def _run_note(args):
    overrides = _run_overrides(args)
    return f"; run overrides: {' '.join(overrides)}" if overrides else ""


def _cfg(args, batch, on_gpu, extra=()):
    from celldino.config import load_config
    overrides = [f"train.batch_size_per_gpu={batch}", "train.num_workers=0", *_run_overrides(args), *extra]
    if on_gpu and not getattr(args, "quick", False):
        return load_config(getattr(args, "train_config", None) or "cell_dino/vitl16_hpaone", overrides)
    return load_config(None, TINY + overrides + ["train.device=cpu"] * (not on_gpu))


def make_batch(cfg, device, dtype, seed=0):
    """One collated batch (random crops, reference masking) on the device."""
    import random

    import numpy as np

    from celldino.data.collate import collate_data_and_cast
    from celldino.data.masking import MaskingGenerator, training_max_num_patches
    g = torch.Generator().manual_seed(seed)
    B, C = cfg.train.batch_size_per_gpu, cfg.student.in_chans
    G, L, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [({"global_crops": [torch.randn(C, G, G, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(C, L, L, generator=g) for _ in range(n_local)]}, 0) for _ in range(B)]
    side = G // cfg.student.patch_size
    batch = collate_data_and_cast(samples, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability, dtype,
                                  n_tokens=side * side,
                                  mask_generator=MaskingGenerator((side, side), max_num_patches=training_max_num_patches(
                                      G, cfg.student.patch_size)),
                                  random_module=random.Random(seed), mask_rng=np.random.default_rng(seed))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["iteration"] = 0
    return batch


# ---- the reference-style trainer -----------------------------------------------------------------------------------

class ReferenceStyleStep:
    """The reference's step without xFormers (see the module docstring), on the same SSLMetaArch weights."""

    def __init__(self, cfg, device):
        from celldino.train.optim import apply_optim_scheduler
        from celldino.train.schedules import build_schedulers
        from celldino.train.ssl_meta_arch import SSLMetaArch
        self.cfg, self.device = cfg, device
        torch.manual_seed(int(cfg.train.seed))
        self.model = SSLMetaArch(cfg).to(device)
        self.model.train()
        groups = self.model.get_params_groups()
        for group in groups:
            group["foreach"] = True
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.schedules = build_schedulers(cfg)
        self.apply_optim_scheduler = apply_optim_scheduler
        self.center = torch.zeros(1, cfg.dino.head_n_prototypes, device=device)
        self.patch_center = torch.zeros(1, cfg.dino.head_n_prototypes, device=device)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _targets(self, logits, center, temp):
        if self.cfg.train.centering == "centering":
            probs = F.softmax((logits.float() - center) / temp, dim=-1)
            center.mul_(0.9).add_(logits.float().mean(0, keepdim=True), alpha=0.1)
            return probs
        from celldino.kernels.sinkhorn import sinkhorn_knopp_reference
        return sinkhorn_knopp_reference(logits, temp)

    def train_step(self, batch, iteration):
        from celldino.kernels.koleo import koleo_loss_reference
        cfg, model = self.cfg, self.model
        lr_s, wd_s, mom_s, temp_s, last_s = self.schedules
        self.apply_optim_scheduler(self.optimizer, lr_s[iteration], wd_s[iteration], last_s[iteration])
        self.optimizer.zero_grad(set_to_none=True)
        g, loc = batch["collated_global_crops"], batch["collated_local_crops"]
        masks = batch["collated_masks"]
        idx, weights = batch["mask_indices_list"], batch["masks_weight"]
        B = g.shape[0] // 2
        n_local = cfg.crops.local_crops_number
        temp = temp_s[iteration]
        with self._autocast():
            with torch.no_grad():
                t_out = model.teacher.backbone.forward_features(g)
                t_cls = t_out["x_norm_clstoken"]
                t_cls = torch.cat((t_cls[B:], t_cls[:B]))
                t_probs = self._targets(model.teacher.dino_head(t_cls), self.center, temp)
                t_patch = model.teacher.dino_head(t_out["x_norm_patchtokens"].flatten(0, 1)[idx])
                t_patch_probs = self._targets(t_patch, self.patch_center, temp)
            s_g = model.student.backbone.forward_features(g, masks=masks)
            s_l = model.student.backbone.forward_features(loc)
            s_g_logits = model.student.dino_head(s_g["x_norm_clstoken"])
            s_l_logits = model.student.dino_head(s_l["x_norm_clstoken"])
            s_patch = model.student.dino_head(s_g["x_norm_patchtokens"].flatten(0, 1)[idx])
        n_terms = 2 + max(2 * n_local, 1)
        loss = 0
        for s_chunk in s_l_logits.chunk(n_local):
            log_p = F.log_softmax(s_chunk.float() / 0.1, dim=-1)
            for t_chunk in t_probs.chunk(2):
                loss = loss - (t_chunk * log_p).sum(-1).mean() / n_terms
        loss = loss - (t_probs * F.log_softmax(s_g_logits.float() / 0.1, -1)).sum(-1).mean() * 2 / n_terms
        loss = loss + 0.1 * sum(koleo_loss_reference(x) for x in s_g["x_norm_clstoken"].chunk(2))
        per_patch = (t_patch_probs * F.log_softmax(s_patch.float() / 0.1, -1)).sum(-1)
        loss = loss - (per_patch * weights).sum() / masks.shape[0]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            m = mom_s[iteration]
            t_params = list(model.teacher.parameters())
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, [p.detach() for p in model.student.parameters()], alpha=1 - m)
        return loss.detach()


# ---- profiling (after timing) -------------------------------------------------------------------------------------

def _profile(args, provider, step, batch, first_iteration, device, batch_size):
    """Profile a few more steps into --train-profile DIR; a failure is reported and does not cost the timed rows."""
    out_dir = getattr(args, "train_profile", None)
    if not out_dir:
        return None
    try:
        result = step_profile.profile_steps(
            step, batch, first_iteration, device, out_dir, f"{provider}_B{batch_size}",
            active=getattr(args, "train_profile_steps", 3) or 3,
            max_trace_mb=getattr(args, "train_profile_trace_mb", 10.0))
    except Exception:  # noqa: BLE001 - diagnostics only: the measured rows still get written
        print(f"[train profile] {provider} B{batch_size} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return None
    print(step_profile.summary_line(result), flush=True)
    return result


# ---- timing ----------------------------------------------------------------------------------------------------------

def _time_steps(step, batch, warmup, steps, device, event=None, synchronize=None):
    """common.Timing of `steps` consecutive steps after `warmup` untimed ones. On CUDA the host is not held back:
    one event before the timed steps and one after each, a single synchronize at the end, each step's time the
    gap between consecutive events (a sync-free step is timed at its steady-state rate, its distribution kept);
    on CPU the wall time of each step. `event` / `synchronize` (default torch.cuda's) are for testing."""
    import time
    for i in range(warmup):
        step(batch, i)
    if device.type != "cuda":
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(batch, warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
        return common.summarize(times)
    event = event or (lambda: torch.cuda.Event(enable_timing=True))
    synchronize = synchronize or torch.cuda.synchronize
    marks = [event() for _ in range(steps + 1)]
    synchronize()  # the warm-up's work is not counted in the first step
    marks[0].record()
    for i in range(steps):
        step(batch, warmup + i)
        marks[i + 1].record()
    synchronize()
    return common.summarize([a.elapsed_time(b) for a, b in zip(marks, marks[1:])])


def _peak_mem(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_mem(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time_trainer(args, cfg, provider, device, batch_size, warmup, steps, profile=True, on_timed=None):
    """(timing, peak MB, dtype, mode) of Trainer.train_step on one fixed batch, and the step FLOPs.
    on_timed(result, flops) runs as soon as the steps are timed, before the profiling pass (the row is made there,
    so a time limit hitting the profile keeps it)."""
    from celldino.train.metrics import ssl_step_flops
    from celldino.train.trainer import Trainer
    out = tempfile.mkdtemp(prefix="bench_train_")
    _reset_mem(device)
    trainer = Trainer(cfg, out, resume=False)
    try:
        batch = make_batch(trainer.cfg, device, trainer.plan.input_dtype)
        n_masked = int(batch["mask_indices_list"].shape[0])
        flops, _ = ssl_step_flops(trainer.model, trainer.cfg, batch_size, n_masked)
        trainer_warmup = warmup + (2 if trainer.plan.compile else 0)
        timing = _time_steps(trainer.train_step, batch, trainer_warmup, steps, device)
        result = (timing, _peak_mem(device), str(trainer.plan.student["backbone"].param_dtype),
                  "compile" if trainer.plan.compile else "eager")
        if on_timed is not None:
            on_timed(result, flops)
        if profile:
            _profile(args, provider, trainer.train_step, batch, trainer_warmup + steps, device, batch_size)
    finally:
        trainer.close()
        del trainer
        shutil.rmtree(out, ignore_errors=True)
        _reset_mem(device)
    return result, flops


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with common.cpu_denormals_flushed(device):
        return _run(args, device)


def _run(args, device):
    on_gpu = device.type == "cuda"
    quick = getattr(args, "quick", False) or not on_gpu
    batches = getattr(args, "train_batch", None) or ([16, 32] if not quick else [4])
    steps = getattr(args, "train_steps", None) or (20 if not quick else 3)
    warmup = 5 if on_gpu else 1
    peak = peak_tflops(device)
    variants = [parse_variant(v) for v in getattr(args, "train_variant", None) or []]
    run_note = _run_note(args)
    rows = []
    for batch_size in batches:
        cfg = _cfg(args, batch_size, on_gpu)
        shape = (f"{cfg.student.arch}/{cfg.student.patch_size} C={cfg.student.in_chans} B={batch_size} "
                 f"2x{cfg.crops.global_crops_size}+{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size} "
                 f"K={cfg.dino.head_n_prototypes}")
        made = {}  # provider -> its row, made as soon as it is timed (a stop keeps it); speed-ups filled at the end

        def add(provider, result, flops, extra_note=""):
            timing, mem, dtype, mode = result
            tflops = flops / timing[0] / 1e9
            mfu = f"MFU {tflops / peak:.1%}" if peak else "MFU n/a (no bf16 peak for this device)"
            is_base = provider == "reference-style"
            made[provider] = common.printed_row(
                lambda r: f"  train {shape} {provider}: {timing[0]:.1f} ms/step, {mfu}",
                "train", "ssl_step", provider, shape, dtype, f"{mode} fwd+bwd+step", timing, flops=flops,
                items=batch_size, peak_mem_mb=mem, baseline="" if is_base else "reference-style", device=device,
                note=f"{1e3 / timing[0]:.2f} steps/s; {mfu}; model FLOPs {flops / 1e12:.3f} T/step"
                     + extra_note + run_note + ("" if on_gpu else "; CPU smoke size"))

        # celldino first, then its variants (each its own Trainer, closed before the next), then the baseline
        _, flops = _time_trainer(args, cfg, "celldino", device, batch_size, warmup, steps,
                                 on_timed=lambda result, f: add("celldino", result, f))
        for name, overrides in variants:
            provider = f"celldino[{name}]"
            try:
                _time_trainer(args, _cfg(args, batch_size, on_gpu, overrides), provider, device, batch_size, warmup,
                              steps, profile=False,
                              on_timed=lambda result, f, p=provider, o=overrides: add(p, result, f, "; " + " ".join(o)))
            except Exception:  # noqa: BLE001 - a failing experiment must not cost the other rows
                print(f"[train] variant {provider} failed:\n{traceback.format_exc()}", file=sys.stderr)
        ref = ReferenceStyleStep(cfg, device)
        ref_batch = make_batch(cfg, device, torch.float16 if on_gpu else torch.float32)
        timing = _time_steps(ref.train_step, ref_batch, warmup, steps, device)
        add("reference-style", (timing, _peak_mem(device), "fp16-autocast" if on_gpu else "float32", "eager"), flops)
        base_ms = timing[0]
        common.fill_speedups(made.values(), base_ms)
        rows += [made.pop("reference-style")] + list(made.values())  # baseline first, then celldino and variants
        if not math.isfinite(base_ms):
            raise RuntimeError("reference-style step time is not finite")
        # after the rows are made, so a time limit hitting the profile still leaves this batch's rows
        _profile(args, "reference-style", ref.train_step, ref_batch, warmup + steps, device, batch_size)
        del ref, ref_batch
        _reset_mem(device)
        rows += _end_to_end(args, batch_size, on_gpu, device, shape, flops, peak)
    return rows


def _end_to_end(args, batch_size, on_gpu, device, shape, flops, peak):
    """The ssl_step+data rows (train_e2e.py) of one batch size; [] when --train-e2e-steps 0."""
    steps = getattr(args, "train_e2e_steps", None)
    steps = (12 if on_gpu else 2) if steps is None else steps
    if steps <= 0:
        return []
    workers = getattr(args, "train_e2e_workers", None)
    workers = train_e2e.default_workers(on_gpu) if workers is None else workers
    n_fields = getattr(args, "train_e2e_fields", None) or (128 if on_gpu else 8)
    size = getattr(args, "train_e2e_size", None) or (512 if on_gpu else 64)
    maker = train_e2e.RowMaker(shape, flops, batch_size, peak, device, workers, size, n_fields, on_gpu,
                               note_suffix=_run_note(args))

    def on_result(provider, result):  # each row as soon as its provider is measured (a stop keeps it)
        r = maker(provider, result)
        print(f"  train e2e {r['provider']}: {r['items_per_s'] or 'skipped'} img/s", flush=True)

    train_e2e.measure(lambda extra: _cfg(args, batch_size, on_gpu, extra), ReferenceStyleStep, device, batch_size,
                      steps, workers, n_fields, size, on_result=on_result)
    made = maker.rows()
    print("  train e2e speed-ups vs reference-style+data: " + ", ".join(
        f"{r['provider']} x{r['speedup_vs_baseline']}" for r in made if r["speedup_vs_baseline"]), flush=True)
    return made
