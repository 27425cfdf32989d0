"""`celldino submit`: run `celldino train` on SLURM through submitit, one task per GPU.

    celldino submit --nodes 4 --gpus-per-node 8 --partition gpu --timeout-min 2800 \\
        --config-file cell_dino/vitl16_hpaone --output-dir /checkpoints/hpaone \\
        train.dataset_path=HPAone:split=ALL:root=/data/hpa

Each task exports the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the SLURM
allocation) and runs the trainer, which resumes from the newest checkpoint in the output directory. SLURM sends
SIGUSR2 `--signal-delay-s` seconds before the time limit (and SIGTERM on preemption): the trainer checkpoints at
its next log point and exits, and on SIGUSR1/SIGUSR2 rank 0 requeues the job (`scontrol requeue`), which then
resumes. Submitit logs go to <output-dir>/submitit/.
"""
import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser):
    from . import launch
    launch.add_arguments(parser)
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks per node")
    slurm.add_argument("--cpus-per-task", type=int, default=10, help="data-loading workers + 1")
    slurm.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: the cluster's)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--constraint", default=None)
    slurm.add_argument("--exclude", default=None)
    slurm.add_argument("--comment", default=None)
    slurm.add_argument("--timeout-min", type=int, default=2800, help="time limit of one allocation (reference)")
    slurm.add_argument("--signal-delay-s", type=int, default=120,
                       help="seconds before the time limit at which SLURM signals the job to checkpoint")
    slurm.add_argument("--job-name", default="celldino")
    slurm.add_argument("--no-requeue", action="store_true",
                       help="exit after the signal-triggered checkpoint instead of requeueing the job")
    slurm.add_argument("--cluster", default=None, choices=("slurm", "local", "debug"),
                       help="submitit cluster (default: slurm when available; local/debug for trying it out)")


class TrainJob:
    """The picklable callable submitit runs in every task."""

    def __init__(self, argv, requeue=True):
        self.argv = list(argv)
        self.requeue = requeue

    def __call__(self):
        import submitit

        from . import launch
        try:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        except RuntimeError:  # not inside a submitit job environment (e.g. the debug executor without one)
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        if not self.requeue:
            os.environ["CELLDINO_NO_REQUEUE"] = "1"
        parser = argparse.ArgumentParser()
        launch.add_arguments(parser)
        code = launch.main(parser.parse_args(self.argv))
        if code:
            raise RuntimeError(f"celldino train exited with code {code} (see the logs in the output directory)")
        return code


def _train_argv(args):
    argv = ["--output-dir", str(Path(args.output_dir).resolve())]
    if args.config_file:
        config = Path(args.config_file)
        argv += ["--config-file", str(config.resolve()) if config.is_file() else args.config_file]
    # no --no-resume here: a requeued job must resume this run; main() sets the old checkpoints aside instead
    return argv + list(args.opts)


def build_executor(args):
    import submitit
    folder = Path(args.output_dir).resolve() / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=30)
    params = dict(name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  tasks_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    # --requeue lets rank 0's `scontrol requeue` work where the cluster does not allow it by default;
    # --kill-on-bad-exit ends every task when one fails, instead of the others waiting out the collective timeout
    slurm = {"slurm_signal_delay_s": args.signal_delay_s, "slurm_additional_parameters": {"requeue": True},
             "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        value = getattr(args, key)
        if value:
            slurm[f"slurm_{key}"] = value
    if executor.cluster == "slurm":
        params.update(slurm)
    executor.update_parameters(**params)
    return executor


def main(args):
    try:
        import submitit
    except ImportError:
        print("celldino submit: submitit is not installed (pip install submitit)", file=sys.stderr)
        return 2
    from celldino.config import ConfigError, load_config
    try:  # fail here, not in the queue, on a bad config
        load_config(args.config_file, args.opts)
    except ConfigError as exc:
        print(f"celldino submit: {exc}", file=sys.stderr)
        return 2
    cluster = args.cluster or submitit.AutoExecutor.which()
    if cluster != "slurm" and args.nodes > 1:  # submitit's local executors run one node: say so before any change
        why = (f"--cluster {args.cluster} runs on this machine only" if args.cluster else
               "this machine has no SLURM (sbatch not found)")
        print(f"celldino submit: --nodes {args.nodes} needs SLURM, but {why}; submit from a SLURM login node "
              "(--cluster slurm), or use torchrun here", file=sys.stderr)
        return 2
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.no_resume:  # start over once, now; every requeue of the job then resumes the new run
        from .checkpointing import set_aside_checkpoints
        aside = set_aside_checkpoints(args.output_dir)
        if aside is not None:
            print(f"celldino submit: starting over; the previous checkpoints are now in {aside}")
    executor = build_executor(args)
    if executor.cluster == "local" and args.cluster != "local":
        print("celldino submit: no SLURM here (sbatch not found): the job runs on this machine as background "
              "processes (pass --cluster local to ask for that)", file=sys.stderr)
    job = executor.submit(TrainJob(_train_argv(args), requeue=not args.no_requeue))
    print(f"celldino submit: {executor.cluster} job {job.job_id} "
          f"({args.nodes} node(s) x {args.gpus_per_node} GPU(s)); "
          f"logs in {Path(args.output_dir).resolve() / 'submitit'}, training output in {args.output_dir}")
    if executor.cluster == "debug":
        job.result()
    return 0
