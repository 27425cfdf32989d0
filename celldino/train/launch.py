"""`celldino train --config-file X --output-dir Y [--no-resume] [key=value ...]`.

Runs in one process (CPU or one GPU) or under torchrun, one process per GPU, single or multi node:

    torchrun --nproc-per-node 8 -m celldino train --config-file cell_dino/vitl16_hpaone --output-dir out \\
        train.dataset_path=HPAone:split=ALL:root=/data/hpa
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m celldino train ...

A rerun of the same command resumes from the newest checkpoint in the output directory.
"""
import logging
import os
import subprocess
import sys

logger = logging.getLogger("celldino")


def add_arguments(parser):
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="a recipe name (demo, cell_dino/vitl16_hpaone, ...) or a yaml file; "
                             "default: the reference defaults")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="checkpoints, logs and metrics go here")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the output directory has a checkpoint")
    parser.add_argument("opts", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. train.batch_size_per_gpu=32 optim.epochs=10")


def _requeue_slurm_job():
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    except Exception as exc:  # noqa: BLE001 - report and exit normally; the checkpoint is on disk
        print(f"celldino train: could not requeue SLURM job {job}: {exc}", file=sys.stderr)
        return False
    print(f"celldino train: SLURM job {job} requeued", file=sys.stderr)
    return True


def train_reporting_errors(cfg, output_dir, resume=True, prog="celldino train"):
    """run_training as a command runs it: (summary, 0), or (None, exit code) after a one-line message for what a
    user can fix (bad settings or input: 2; divergence or no loadable checkpoint: 1) instead of a traceback."""
    from .checkpointing import NoUsableCheckpointError
    from .trainer import TrainingDivergedError, run_training
    from celldino.data.loaders import worker_error_message
    try:
        return run_training(cfg, output_dir, resume=resume), 0
    except (TrainingDivergedError, NoUsableCheckpointError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None, 1
    except ValueError as exc:  # bad settings or input found while building or running the run
        print(f"{prog}: {worker_error_message(exc) or exc}", file=sys.stderr)
        return None, 2
    except RuntimeError as exc:  # a bad file met by a DataLoader worker arrives wrapped in a RuntimeError
        message = worker_error_message(exc)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return None, 2


def main(args):
    from celldino.config import ConfigError, load_config
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as exc:
        print(f"celldino train: {exc}", file=sys.stderr)
        return 2
    summary, code = train_reporting_errors(cfg, args.output_dir, resume=not args.no_resume)
    if summary is None:
        return code
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        last = summary.get("last_losses") or {}
        loss = f", last total loss {last['total_loss']:.4f}" if last else ""
        print(f"celldino train: {summary['stopped']} at iteration {summary['end_iteration']} of "
              f"{summary['max_iter']}{loss}; checkpoint {summary.get('checkpoint')}", flush=True)
        if summary.get("skipped_items"):
            print(f"celldino train: {summary['skipped_items']} unreadable items skipped (on_error=skip; each is "
                  "named in logs/log.txt)", flush=True)
    if (summary["stopped"] == "signal" and summary.get("signal") in ("SIGUSR1", "SIGUSR2") and rank == 0
            and os.environ.get("CELLDINO_NO_REQUEUE") != "1"):
        _requeue_slurm_job()
    return 0
