"""`celldino train` launched by the real torchrun, as two nodes of one process each (static env:// rendezvous on
localhost, node ranks 0 and 1): the CLI path a multi-node user runs, on CPU with gloo."""
import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from local_ports import communicate_on_a_free_port
from train_helpers import tiny_cfg

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_two_torchrun_nodes_train_one_run(tmp_path):
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_cfg("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3", "evaluation.eval_period_iterations=0",
                            "train.checkpoint_period=100"), config)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start(port):  # node 0 first: its agent hosts the rendezvous store on the port
        return [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
             str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "celldino", "train",
             "--config-file", str(config), "--output-dir", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [log for _, log in communicate_on_a_free_port(start, timeout=240)]
    # node 0 hosts global rank 0, which prints the run's summary line; exit codes are not trusted alone (FSDP2 +
    # gloo processes sometimes abort at interpreter exit after a clean shutdown)
    assert "2 x cpu" in logs[0] and "celldino train: finished at iteration 3 of 3" in logs[0], logs[0][-4000:]
    assert "celldino train:" not in logs[1], logs[1][-4000:]  # rank 1 stays quiet
    metrics = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines() if line.strip()]
    assert [m["iteration"] for m in metrics] == [0, 2]
    assert all(math.isfinite(m["total_loss"]) and m["images_per_s"] > 0 for m in metrics)
    # one DCP checkpoint with a shard from each node's rank, and the teacher export
    shards = sorted(p.name for p in (out / "checkpoints" / "iter_00000002").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert (out / "eval" / "training_2" / "teacher_checkpoint.pth").is_file()
