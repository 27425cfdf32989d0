"""The training loop end to end on CPU (tiny ViT, real 16-bit sample cells): output directory, metrics, teacher
exports loadable by celldino.hub, exact resume (stop_after_iters), NaN stop, signals, config errors."""
import argparse
import json
import logging
import os
import signal

import pytest
import torch

from celldino.config import load_config
from celldino.train import launch
from celldino.train.ssl_meta_arch import SSLMetaArch
from celldino.train.trainer import TrainingDivergedError, _check_config, run_training

from train_helpers import tiny_cfg


def _files(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def test_run_writes_the_reference_output_dir(tmp_path):
    cfg = tiny_cfg("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "evaluation.eval_period_iterations=2")
    summary = run_training(cfg, tmp_path, resume=True)
    assert summary["stopped"] == "finished" and summary["iterations_run"] == 4 and summary["end_iteration"] == 4
    assert [it for it, _ in summary["loss_history"]] == [0, 1, 2, 3]

    saved = (tmp_path / "config.yaml").read_text()
    from omegaconf import OmegaConf
    saved_cfg = OmegaConf.create(saved)
    assert saved_cfg.optim.lr == pytest.approx(cfg.optim.base_lr * (4 / 1024) ** 0.5)  # sqrt_wrt_1024, 1 rank
    assert saved_cfg.train.output_dir == str(tmp_path.resolve())
    assert (tmp_path / "logs" / "log.txt").stat().st_size > 0

    lines = [json.loads(line) for line in (tmp_path / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 2, 3]  # log_period 2, plus the last iteration
    reference_keys = {"iteration", "iter_time", "data_time", "lr", "wd", "mom", "last_layer_lr", "current_batch_size",
                      "total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    for record in lines:
        assert reference_keys <= set(record)
        assert {"images_per_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_mb"} <= set(record)
        assert record["current_batch_size"] == 4
        assert record["images_per_s"] > 0 and record["tflops_per_gpu"] > 0
    # the first line is iteration 0 alone: its median is that iteration's total, the sum of its terms
    first_terms = summary["loss_history"][0][1]
    assert lines[0]["total_loss"] == pytest.approx(sum(first_terms))
    assert lines[0]["lr"] == 0.0 and lines[0]["last_layer_lr"] == 0.0  # warmup starts at 0, last layer frozen

    assert _files(tmp_path / "checkpoints") == ["iter_00000003"]
    assert _files(tmp_path / "eval") == ["training_1", "training_3"]
    export = tmp_path / "eval" / "training_3"
    teacher = torch.load(export / "teacher_checkpoint.pth", weights_only=True)
    assert set(teacher) == {"teacher"}
    keys = set(teacher["teacher"])
    assert keys and all(k.startswith(("backbone.", "dino_head.")) for k in keys)
    assert "dino_head.last_layer.weight_g" in keys and "backbone.blocks.1.attn.qkv.weight" in keys

    from celldino.hub import load_backbone
    from_safetensors = load_backbone(export / "teacher_backbone.safetensors")
    from_pth = load_backbone(export / "teacher_checkpoint.pth")  # num_heads from the export written beside it
    assert from_pth.num_heads == 2
    lone = tmp_path / "lone" / "teacher_checkpoint.pth"  # copied away from its export: only the weights speak
    lone.parent.mkdir()
    lone.write_bytes((export / "teacher_checkpoint.pth").read_bytes())
    with pytest.raises(Exception, match="does not record num_heads"):
        load_backbone(lone)
    assert load_backbone(lone, num_heads=2).num_heads == 2
    assert from_safetensors.num_heads == 2 and from_safetensors.embed_dim == 32
    for key, value in from_pth.state_dict().items():
        assert torch.equal(value, from_safetensors.state_dict()[key]), key
        assert torch.equal(value, teacher["teacher"][f"backbone.{key}"]), key
    x = torch.randn(2, 1, 32, 32)
    assert from_safetensors(x).shape == (2, 32)

    # a rerun of a finished run resumes and has nothing left to do
    again = run_training(cfg, tmp_path, resume=True)
    assert again["iterations_run"] == 0 and again["start_iteration"] == 4


def test_stop_after_iters_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    cfg = tiny_cfg("evaluation.eval_period_iterations=3")  # 8 iterations, checkpoint period 12 -> final only
    straight = run_training(cfg, tmp_path / "straight", resume=True)
    assert straight["iterations_run"] == 8

    out = tmp_path / "interrupted"
    first = run_training(tiny_cfg("evaluation.eval_period_iterations=3", "train.stop_after_iters=3",
                                  "train.num_workers=1"),  # the batches do not depend on the worker count
                         out, resume=True)
    assert first["stopped"] == "stop_after_iters" and first["end_iteration"] == 3
    assert _files(out / "checkpoints") == ["iter_00000002"]
    second = run_training(tiny_cfg("evaluation.eval_period_iterations=3", "train.stop_after_iters=3"), out)
    assert second["start_iteration"] == 3 and second["end_iteration"] == 6
    third = run_training(tiny_cfg("evaluation.eval_period_iterations=3"), out)
    assert third["start_iteration"] == 6 and third["stopped"] == "finished"

    resumed = first["loss_history"] + second["loss_history"] + third["loss_history"]
    assert resumed == straight["loss_history"]  # bit for bit
    # (equal losses after iteration 0 also mean equal schedules: lr, wd, momentum and temperature all enter them)
    for tag in ("training_2", "training_5", "training_7"):
        a = torch.load(tmp_path / "straight" / "eval" / tag / "teacher_checkpoint.pth", weights_only=True)["teacher"]
        b = torch.load(out / "eval" / tag / "teacher_checkpoint.pth", weights_only=True)["teacher"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tag


def test_no_resume_starts_over(tmp_path):
    """The previous run's checkpoints are set aside, not mixed with the new ones: keep-last-N used to prune the new,
    lower-numbered checkpoint at once, and the next plain rerun then 'resumed' the old, finished run."""
    first = run_training(tiny_cfg("optim.epochs=3", "train.OFFICIAL_EPOCH_LENGTH=4", "train.checkpoint_period=4"),
                         tmp_path)
    assert first["end_iteration"] == 12
    cfg = tiny_cfg("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "train.checkpoint_period=2")
    again = run_training(tiny_cfg("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "train.checkpoint_period=2",
                                  "train.stop_after_iters=2"), tmp_path, resume=False)
    assert again["start_iteration"] == 0 and again["checkpoint"].endswith("iter_00000001")
    assert _files(tmp_path / "checkpoints") == ["iter_00000001"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and _files(aside[0]) == ["iter_00000003", "iter_00000007", "iter_00000011",
                                                    "training_metrics.json"]
    resumed = run_training(cfg, tmp_path)  # the new run goes on, from its own checkpoint
    assert resumed["start_iteration"] == 2 and resumed["end_iteration"] == 4
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "training_metrics.json")]
    assert logged == sorted(set(logged))  # each iteration once, the new run's only


def _inject(monkeypatch, iteration, action):
    original = SSLMetaArch.compute_losses

    def compute_losses(self, batch, teacher_temp):
        total, terms = original(self, batch, teacher_temp)
        if batch["iteration"] == iteration:
            total, terms = action(total, terms)
        return total, terms
    monkeypatch.setattr(SSLMetaArch, "compute_losses", compute_losses)


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    def poison(total, terms):
        terms = dict(terms, ibot_loss=terms["ibot_loss"] * float("nan"))
        return total * float("nan"), terms
    _inject(monkeypatch, 3, poison)
    cfg = tiny_cfg("train.checkpoint_period=2", "evaluation.eval_period_iterations=2", "train.log_period=4")
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss or gradient at iteration 3.*iter_00000001"):
        run_training(cfg, tmp_path)
    # iteration 3 would have been a checkpoint and an export: neither was written
    assert _files(tmp_path / "checkpoints") == ["iter_00000001"]
    assert _files(tmp_path / "eval") == ["training_1"]
    monkeypatch.undo()
    resumed = run_training(cfg, tmp_path)
    assert resumed["start_iteration"] == 2 and resumed["stopped"] == "finished"


def test_an_inf_gradient_under_a_finite_loss_stops_before_a_checkpoint_holds_nan_weights(tmp_path, monkeypatch):
    original = SSLMetaArch.clip_gradients
    calls = []

    def clip_gradients(self, max_norm):
        calls.append(1)
        if len(calls) == 4:  # iteration 3 (the first step is iteration 0)
            next(p for p in self.student.backbone.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return original(self, max_norm)
    monkeypatch.setattr(SSLMetaArch, "clip_gradients", clip_gradients)
    cfg = tiny_cfg("train.checkpoint_period=2", "evaluation.eval_period_iterations=2", "train.log_period=4")
    with pytest.raises(TrainingDivergedError, match=r"at iteration 3: .*'gradient_norm': (inf|nan).*iter_00000001"):
        run_training(cfg, tmp_path)
    assert _files(tmp_path / "checkpoints") == ["iter_00000001"] and _files(tmp_path / "eval") == ["training_1"]


def test_sigterm_checkpoints_then_stops(tmp_path, monkeypatch):
    def send(total, terms):
        os.kill(os.getpid(), signal.SIGTERM)
        return total, terms
    _inject(monkeypatch, 1, send)
    previous = signal.getsignal(signal.SIGTERM)
    summary = run_training(tiny_cfg(), tmp_path)
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    assert summary["stopped"] == "signal" and summary["signal"] == "SIGTERM"
    assert summary["end_iteration"] == 3  # stops at the next log point (iteration 2) after a checkpoint
    assert _files(tmp_path / "checkpoints") == ["iter_00000002"]


def _launch(*argv):
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    return launch.main(parser.parse_args(list(argv)))


def test_cli_errors_name_the_bad_key(tmp_path, capsys):
    assert _launch("--config-file", "demo", "--output-dir", str(tmp_path), "train.not_a_key=1") == 2
    assert "train.not_a_key" in capsys.readouterr().err
    assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "b"), "train.stop_after_iters=0",
                   "train.device=cpu") == 2
    assert "train.stop_after_iters" in capsys.readouterr().err
    assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "d"), "train.batch_size_per_gpu=eight") == 2
    assert "`train.batch_size_per_gpu` is 'eight'; expected a number" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "e"), "train.device=cuda") == 2
        assert "train.device=cuda but no CUDA GPU is visible" in capsys.readouterr().err
    # KoLeo on one image per rank fails before any model is built (it has no nearest neighbour)
    assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "c"), "train.batch_size_per_gpu=1",
                   "train.device=cpu") == 2
    assert "KoLeo needs at least 2 images per rank" in capsys.readouterr().err
    # settings the reference would misuse or ignore, refused naming the key
    for setting, message in (("crops.local_crops_size=20", "crops.local_crops_size 20 is not a multiple of"),
                             ("train.max_to_keep=-1", "train.max_to_keep"),
                             ("train.max_to_keep=2.5", "train.max_to_keep: expected a whole number >= 0"),
                             ("train.log_period=1.5", "train.log_period: expected a whole number >= 1"),
                             ("train.fsdp_blocks_per_unit=0", "train.fsdp_blocks_per_unit: expected a whole number")):
        assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "x"), setting,
                       "train.device=cpu") == 2, setting
        assert message in capsys.readouterr().err, setting
    from train_helpers import tiny_cfg
    with pytest.raises(ValueError, match="student.channel_adaptive=true needs student.in_chans=1"):
        _check_config(tiny_cfg("student.channel_adaptive=true", "student.in_chans=4"))
    # MODEL.WEIGHTS is read by the reference only with --eval-only: refused, not silently ignored
    assert _launch("--config-file", "demo", "--output-dir", str(tmp_path / "w"), "MODEL.WEIGHTS=teacher.pth") == 2
    assert "MODEL.WEIGHTS='teacher.pth' is not used by celldino train" in capsys.readouterr().err
    # settings checked while the trainer is built fail before config.yaml is written (a corrected rerun there would
    # otherwise report the settings of a run that never trained as changed)
    for setting, message in (("train.compile=maybe", "train.compile: expected true, false or auto, got 'maybe'"),
                             ("train.augmentation=foo", "train.augmentation"),
                             ("train.fsdp_shard_size=two", "train.fsdp_shard_size")):
        out = tmp_path / setting.split("=")[0]
        assert _launch("--config-file", "demo", "--output-dir", str(out), setting, "train.device=cpu",
                       *(["train.fsdp=true"] if "fsdp" in setting else [])) == 2
        assert message in capsys.readouterr().err
        assert not (out / "config.yaml").exists()


def test_sigterm_to_the_whole_process_group_with_workers_still_checkpoints(tmp_path):
    """SLURM preemption signals every process of the job: DataLoader workers must not die first (the run would
    end with "DataLoader worker is killed" and no checkpoint); the training process saves, then exits 0."""
    import subprocess
    import sys
    import time

    from train_helpers import TINY
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "celldino", "train", "--output-dir", str(out), *TINY, "train.num_workers=2",
           "optim.epochs=100", "train.log_period=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "training_metrics.json").is_file():  # the workers have delivered batches
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"training did not start: {proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "killed by signal" not in err
    assert [p for p in _files(out / "checkpoints") if p.startswith("iter_")]
    assert (out / "logs" / "log.txt").read_text().count("received SIGTERM") == 1


def test_cli_names_the_bad_dataset_file_or_key_before_building_anything(tmp_path, capsys):
    """Bad input meets the user as one line naming the file or the key, never a worker's traceback: a corrupt
    TIFF read in a DataLoader worker, a channel count that does not match the model, an unknown dataset."""
    import shutil

    from train_helpers import SAMPLE_CSV, TINY
    cells = tmp_path / "cells"
    cells.mkdir()
    sources = sorted((SAMPLE_CSV.parent / "train").rglob("*.tif"))[:4]
    for k, src in enumerate(sources):
        shutil.copy(src, cells / f"cell_{k}.tif")
    (cells / "cell_3.tif").write_bytes(b"II*\x00 truncated")  # not the first item: only a worker reads it
    base = [o for o in TINY if not o.startswith("train.dataset_path")]
    run = ["--output-dir", str(tmp_path / "out"), *base, f"train.dataset_path=Folder:root={cells}"]

    assert _launch(*run, "train.num_workers=1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"celldino train: {cells / 'cell_3.tif'}: ")

    # the user may choose to skip unreadable files instead: counted, and said at the end
    assert _launch("--output-dir", str(tmp_path / "skip"), *base, f"train.dataset_path=Folder:root={cells}:on_error=skip",
                   "train.stop_after_iters=2") == 0
    out = capsys.readouterr().out
    assert "stop_after_iters at iteration 2" in out and "unreadable items skipped (on_error=skip" in out

    (cells / "cell_3.tif").unlink()
    assert _launch(*run, "student.in_chans=3", "--output-dir", str(tmp_path / "out2")) == 2
    err = capsys.readouterr().err
    assert f"{cells / 'cell_0.tif'} has 1 channel(s)" in err and "student.in_chans=3" in err
    assert not (tmp_path / "out2").exists()  # nothing was built

    assert _launch(*run, "train.dataset_path=Imagenet:root=/nowhere") == 2
    assert "train.dataset_path: dataset string 'Imagenet:root=/nowhere': unknown dataset" in capsys.readouterr().err


def test_cli_trains_and_resumes(tmp_path, capsys):
    from train_helpers import TINY
    args = ["--config-file", "demo", "--output-dir", str(tmp_path)] + TINY + ["optim.epochs=1",
                                                                                "train.OFFICIAL_EPOCH_LENGTH=2"]
    assert _launch(*args, "train.stop_after_iters=1") == 0
    assert "stop_after_iters at iteration 1 of 2" in capsys.readouterr().out
    assert _launch(*args) == 0
    out = capsys.readouterr()
    assert "finished at iteration 2 of 2" in out.out and "settings changed" not in out.err  # stop_after_iters only
    # a stop that falls on the last iteration is the end of the run
    other = ["--config-file", "demo", "--output-dir", str(tmp_path / "other")] + TINY + [
        "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "train.stop_after_iters=2"]
    assert _launch(*other) == 0 and "finished at iteration 2 of 2" in capsys.readouterr().out
    # resuming with another schedule is allowed (as the reference) but said, on the console and in the log
    assert _launch(*args, "optim.epochs=2", "optim.base_lr=0.001") == 0
    err = capsys.readouterr().err
    assert "settings changed since the previous run in this directory: optim.base_lr: 0.004 -> 0.001" in err
    assert "optim.epochs: 1 -> 2" in err and "optim.lr:" in err
    assert "optim.epochs: 1 -> 2" in (tmp_path / "logs" / "log.txt").read_text()


def test_submit_runs_the_trainer_through_submitit(tmp_path, monkeypatch, capsys):
    """The submitit path end to end with its in-process debug executor (what SLURM tasks run), plus the SLURM
    parameters it would submit."""
    pytest.importorskip("submitit")
    from train_helpers import TINY

    from celldino.train import submit
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CELLDINO_NO_REQUEUE"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards even if the job sets them
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = parser.parse_args(["--cluster", "debug", "--nodes", "1", "--gpus-per-node", "1", "--config-file", "demo",
                              "--output-dir", str(tmp_path)] + TINY + ["optim.epochs=1",
                                                                      "train.OFFICIAL_EPOCH_LENGTH=2"])
    assert submit.main(args) == 0
    assert "finished at iteration 2 of 2" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "iter_00000001").is_dir() and (tmp_path / "submitit").is_dir()
    # --no-resume starts over once, at submission: the job itself (and so every requeue of it) resumes
    again = parser.parse_args(["--cluster", "debug", "--config-file", "demo", "--output-dir", str(tmp_path),
                               "--no-resume"] + TINY + ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2"])
    assert "--no-resume" not in submit._train_argv(again)
    assert submit.main(again) == 0
    out = capsys.readouterr().out
    assert "starting over; the previous checkpoints are now in" in out and "finished at iteration 2 of 2" in out

    import submitit.slurm.slurm as slurm_module
    monkeypatch.setattr(slurm_module.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    args = parser.parse_args(["--cluster", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                              "--timeout-min", "600", "--output-dir", str(tmp_path / "slurm")])
    executor = submit.build_executor(args)
    params = executor._executor.parameters
    assert params["nodes"] == 4 and params["ntasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["partition"] == "gpu" and params["time"] == 600 and params["signal_delay_s"] == 120
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit", "0")
    assert "#SBATCH --nodes=4" in sbatch and "#SBATCH --signal=USR2@120" in sbatch
    assert "#SBATCH --requeue" in sbatch and "--kill-on-bad-exit=1" in sbatch
    bad = parser.parse_args(["--cluster", "debug", "--output-dir", str(tmp_path / "bad"), "train.nope=1"])
    assert submit.main(bad) == 2 and "train.nope" in capsys.readouterr().err
    # several nodes without SLURM: one line, nothing created or set aside (submitit's local executor would fail
    # with a traceback after creating the output directory)
    monkeypatch.setattr(slurm_module.SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    (tmp_path / "multi" / "checkpoints" / "iter_00000001").mkdir(parents=True)
    multi = parser.parse_args(["--nodes", "4", "--gpus-per-node", "8", "--output-dir", str(tmp_path / "multi"),
                               "--no-resume"])
    assert submit.main(multi) == 2
    assert "--nodes 4 needs SLURM, but this machine has no SLURM" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["checkpoints"]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch.distributed.checkpoint as dcp
from celldino.train import checkpointing
from train_helpers import tiny_cfg
from celldino.train.trainer import run_training
saves = []
real_save = dcp.save
def slow_save(state, checkpoint_id, **kw):
    saves.append(checkpoint_id)
    real_save(state, checkpoint_id=checkpoint_id, **kw)
    if len(saves) == 2:  # the second checkpoint: written to its temporary directory, never renamed
        open({marker!r}, "w").write(checkpoint_id)
        time.sleep(600)
checkpointing.dcp.save = slow_save
run_training(tiny_cfg("train.checkpoint_period=2"), {out!r})
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    import subprocess
    import sys
    import time
    out, marker = tmp_path / "run", tmp_path / "saving"
    script = KILL_SCRIPT.format(tests=str(os.path.dirname(__file__)), marker=str(marker), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the training subprocess ended before the second save: {proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        proc.kill()  # SIGKILL in the middle of the save
    finally:
        proc.wait()
    partial = out / "checkpoints" / ".tmp-iter_00000003"
    assert partial.is_dir() and any(partial.iterdir())
    assert _files(out / "checkpoints") == [".tmp-iter_00000003", "iter_00000001"]
    resumed = run_training(tiny_cfg("train.checkpoint_period=2"), out)
    assert resumed["start_iteration"] == 2 and resumed["stopped"] == "finished"
    assert not partial.exists()  # the interrupted save was cleaned up
    logged = [json.loads(line)["iteration"] for line in open(out / "training_metrics.json")]
    assert logged == sorted(set(logged))  # lines logged after the last checkpoint were not written twice


def test_unused_reference_keys_that_disagree_with_the_used_ones_are_named(caplog):
    """teacher.in_chans / channel_adaptive and the shared iBOT head's sizes are read nowhere (as the reference): a
    value that disagrees with the key actually used is logged, a consistent config is quiet."""
    from train_helpers import tiny_cfg
    with caplog.at_level(logging.WARNING, logger="celldino"):
        _check_config(tiny_cfg())
        _check_config(load_config("demo"))
        assert "unused" not in caplog.text
        _check_config(tiny_cfg("teacher.in_chans=7", "ibot.head_n_prototypes=99"))
    assert "teacher.in_chans=7 differs from student.in_chans" in caplog.text
    assert "ibot.head_n_prototypes differ from dino.* but are unused" in caplog.text
