"""Multi-process CPU training with FSDP2 on gloo: a 2-rank run matches a 1-rank run on the same global batch, and
DCP checkpoints move between world sizes (saved on 2 ranks -> resumed on 1, and back)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from celldino.train import distributed
from celldino.train.trainer import Trainer

from local_ports import communicate_on_a_free_port
from train_helpers import tiny_cfg

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "_dist_worker.py"


def _run_ranks(tmp_path, world, spec, timeout=240):
    """Start `world` worker processes; return their result dicts. A rank counts as successful when it wrote its
    result file (after training returned and its process group was destroyed): FSDP2 + gloo processes sometimes
    abort at interpreter exit after a clean shutdown, so the exit code alone is not trusted either way; a rank
    that wrote nothing is a failure and its output is shown."""
    spec = dict(spec, result=str(tmp_path / f"result-{world}"))
    spec_path = tmp_path / f"spec-{world}-{abs(hash(json.dumps(spec)))}.json"
    spec_path.write_text(json.dumps(spec))

    def start(port):
        return [subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
                for rank in range(world)]
    outputs = communicate_on_a_free_port(start, timeout)
    results = []
    for rank, (code, out) in enumerate(outputs):
        path = Path(f"{spec['result']}.rank{rank}.json")
        if not path.exists():
            pytest.fail(f"rank {rank} of {world} failed (exit code {code}) without finishing:\n{out[-6000:]}")
        result = json.loads(path.read_text())
        assert result["done"], out[-3000:]
        path.unlink()
        results.append(result)
    return results


def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path):
    """Global batch 8 = 1 rank x 8 or 2 ranks x 4 (FSDP2, gloo). Sinkhorn-Knopp centering and the all-gathered
    KoLeo make the objective independent of the split (EMA centering of iBOT averages per-rank means, as the
    reference, so it is not); no stochastic depth. Tolerance: 1e-5 relative on every loss term of 4 steps (fp32
    reductions in another order; observed differences are around 1e-7). LayerScale 1.0: with the default 1e-5 the
    CLS tokens of a fresh model are nearly identical, and KoLeo's log of their tiny distances amplifies fp32 noise."""
    common = ["train.centering=sinkhorn_knopp", "dino.koleo_distributed=true", "optim.epochs=1",
              "train.OFFICIAL_EPOCH_LENGTH=4", "evaluation.eval_period_iterations=0", "optim.base_lr=0.05",
              "train.checkpoint_period=100", "student.layerscale=1.0"]
    one = tiny_cfg(*common, "train.batch_size_per_gpu=8")
    from _dist_worker import synthetic_batches
    trainer = Trainer(one, tmp_path / "one")
    try:
        # the scaling rule gives both runs the same lr (global batch 8)
        reference = trainer.run(synthetic_batches(trainer.cfg, 0, 1, trainer.max_iter))["loss_history"]
    finally:
        trainer.close()
    results = _run_ranks(tmp_path, 2, {"overrides": common + ["train.batch_size_per_gpu=4"],
                                       "output_dir": str(tmp_path / "two"), "synthetic": True})
    for result in results:
        assert [it for it, _ in result["loss_history"]] == [0, 1, 2, 3]
        for (_, got), (_, want) in zip(result["loss_history"], reference):
            assert got == pytest.approx(want, rel=1e-5)


def test_hsdp_and_no_shard_match_one_rank_on_the_same_global_batch(tmp_path):
    """HSDP: 4 ranks as 2 replicas x 2-rank shard groups (train.fsdp_shard_size=2), and the reference's NO_SHARD
    strategy on 2 ranks (every rank a full replica, gradients all-reduced): both give the 1-process losses of the same
    global batch of 8 (tolerance as the 2-rank FSDP test), with the parameters on the mesh asked for."""
    common = ["train.centering=sinkhorn_knopp", "dino.koleo_distributed=true", "optim.epochs=1",
              "train.OFFICIAL_EPOCH_LENGTH=3", "evaluation.eval_period_iterations=0", "optim.base_lr=0.05",
              "train.checkpoint_period=100", "student.layerscale=1.0"]
    from _dist_worker import synthetic_batches
    trainer = Trainer(tiny_cfg(*common, "train.batch_size_per_gpu=8"), tmp_path / "one")
    try:
        reference = trainer.run(synthetic_batches(trainer.cfg, 0, 1, trainer.max_iter))["loss_history"]
    finally:
        trainer.close()
    no_shard = [f"compute_precision.{role}.{name}.sharding_strategy=NO_SHARD"
                for role in ("student", "teacher") for name in ("backbone", "dino_head", "ibot_head")]
    # (the HSDP run also prefetches explicitly: all-gathers issued a unit ahead change no number)
    runs = (("hsdp", 4, ["train.fsdp_shard_size=2", "train.fsdp_prefetch=1", "train.batch_size_per_gpu=2"], [2, 2]),
            ("no_shard", 2, no_shard + ["train.batch_size_per_gpu=4"], [2, 1]))
    for name, world, extra, mesh_shape in runs:
        results = _run_ranks(tmp_path, world, {"overrides": common + extra, "output_dir": str(tmp_path / name),
                                               "synthetic": True})
        for result in results:
            assert result["mesh_shape"] == mesh_shape, name
            assert result["placements"] == ["Replicate", "Shard"], name
            assert [it for it, _ in result["loss_history"]] == [0, 1, 2], name
            for (_, got), (_, want) in zip(result["loss_history"], reference):
                assert got == pytest.approx(want, rel=1e-5), name


def test_one_process_fsdp2_trains_like_the_unsharded_process(tmp_path):
    """train.fsdp=true in one process: FSDP2 on a 1-rank group (bench_train_fsdp's setting) gives the unsharded
    process's losses (fp32, CPU) to 1e-5 relative over 4 steps, with the student really sharded (DTensors), also
    with several blocks per FSDP unit."""
    common = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "evaluation.eval_period_iterations=0",
              "optim.base_lr=0.05", "train.checkpoint_period=100", "student.layerscale=1.0",
              "train.batch_size_per_gpu=8"]
    from _dist_worker import synthetic_batches
    trainer = Trainer(tiny_cfg(*common), tmp_path / "plain")
    try:
        assert not distributed.is_initialized()
        reference = trainer.run(synthetic_batches(trainer.cfg, 0, 1, trainer.max_iter))["loss_history"]
    finally:
        trainer.close()
    # one FSDP unit per block (the default) and both blocks in one unit (train.fsdp_blocks_per_unit)
    for name, extra in (("fsdp", []), ("fsdp_grouped", ["train.fsdp_blocks_per_unit=2"]),
                        ("fsdp_prefetch", ["train.fsdp_prefetch=2"])):
        (result,) = _run_ranks(tmp_path, 1, {"overrides": common + ["train.fsdp=true", *extra],
                                             "output_dir": str(tmp_path / name), "synthetic": True})
        assert result["world"] == 1 and result["sharded"]
        # two blocks: the first gathers the second ahead when asked to (the last has nothing after it)
        assert result["forward_prefetch"] == ([1, 0] if name == "fsdp_prefetch" else [0, 0])
        assert [it for it, _ in result["loss_history"]] == [0, 1, 2, 3]
        for (_, got), (_, want) in zip(result["loss_history"], reference):
            assert got == pytest.approx(want, rel=1e-5)


def test_checkpoint_moves_between_world_sizes(tmp_path):
    out = tmp_path / "run"
    common = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=6", "evaluation.eval_period_iterations=2",
              "train.batch_size_per_gpu=2"]
    # 2 ranks: 2 iterations, stop with a checkpoint (and a teacher export) at iteration 1
    results = _run_ranks(tmp_path, 2, {"overrides": common + ["train.stop_after_iters=2"], "output_dir": str(out)})
    assert all(r["stopped"] == "stop_after_iters" and r["end_iteration"] == 2 for r in results)
    meta = json.loads((out / "checkpoints" / "iter_00000001" / "meta.json").read_text())
    assert meta["world_size"] == 2

    # 1 rank resumes from the sharded checkpoint: the full teacher equals the one the 2 ranks exported
    assert _resume_in_one_process(out, tiny_cfg(*common, "train.stop_after_iters=2"))["end_iteration"] == 4

    # and back to 2 ranks: the full teacher gathered from the shards equals the 1-rank export at iteration 3
    results = _run_ranks(tmp_path, 2, {"overrides": common, "output_dir": str(out),
                                       "compare_teacher": str(out / "eval" / "training_3" / "teacher_checkpoint.pth")})
    assert results[0]["start_iteration"] == 4 and results[0]["teacher_equal"] is True
    assert all(r["stopped"] == "finished" and r["end_iteration"] == 6 for r in results)


def test_an_hsdp_checkpoint_resumes_in_one_process(tmp_path):
    """A checkpoint of 4 ranks as 2 replicas x 2 shards (DCP writes each shard once) loads into one unsharded
    process: the teacher equals the one the HSDP run exported, the optimizer state is there, training goes on."""
    out = tmp_path / "run"
    common = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "evaluation.eval_period_iterations=2",
              "train.batch_size_per_gpu=2"]
    results = _run_ranks(tmp_path, 4, {"overrides": common + ["train.stop_after_iters=2", "train.fsdp_shard_size=2"],
                                       "output_dir": str(out)})
    assert all(r["mesh_shape"] == [2, 2] and r["end_iteration"] == 2 for r in results)
    assert _resume_in_one_process(out, tiny_cfg(*common))["end_iteration"] == 4


def _resume_in_one_process(out, cfg):
    """Resume the sharded run in `out` (stopped after iteration 1) in this process: the teacher equals the one the
    sharded run exported at iteration 1 and the optimizer state was loaded; returns the summary of running on."""
    trainer = Trainer(cfg, out)
    try:
        assert trainer.start_iter == 2
        saved = torch.load(out / "eval" / "training_1" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
        state = trainer.model.teacher.state_dict()
        assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)
        optim_state = trainer.optimizer.state_dict()["state"]
        assert optim_state and all(int(s["step"]) == 2 for s in optim_state.values())
        return trainer.run()
    finally:
        trainer.close()


def test_an_inf_loss_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    overrides = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=6", "train.checkpoint_period=2",
                 "evaluation.eval_period_iterations=0", "train.batch_size_per_gpu=2", "train.log_period=10"]
    results = _run_ranks(tmp_path, 2, {"overrides": overrides, "output_dir": str(out), "nan_rank": 1,
                                       "nan_iteration": 2})
    for result in results:  # rank 0's own loss was finite: it stops because the reduced loss is not
        assert result["stopped"].startswith("diverged: non-finite loss or gradient at iteration 2"), result["stopped"]
        assert "iter_00000001" in result["stopped"]
    # the checkpoint due after iteration 3 was never written; the one after iteration 1 is intact
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_00000001"]


def test_a_signal_on_one_rank_stops_every_rank_and_every_rank_knows_which(tmp_path):
    """SLURM's time-limit warning may reach one rank only: all ranks checkpoint and stop, and rank 0 (which
    requeues the job on SIGUSR1/2) learns it was SIGUSR2, not merely "a peer"."""
    out = tmp_path / "run"
    overrides = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=8", "train.checkpoint_period=100",
                 "evaluation.eval_period_iterations=0", "train.batch_size_per_gpu=2", "train.log_period=2"]
    results = _run_ranks(tmp_path, 2, {"overrides": overrides, "output_dir": str(out), "signal_rank": 1,
                                       "signal_iteration": 1, "signal_name": "SIGUSR2"})
    for result in results:
        assert result["stopped"] == "signal" and result["signal"] == "SIGUSR2" and result["end_iteration"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_00000002"]
