"""`celldino train` checkpoint directories (checkpoints/iter_<n>/, torch.distributed.checkpoint) as backbone sources
for load_backbone and `celldino export`: the teacher backbone read from a real training checkpoint is bit-identical
to the teacher that the same run exported at the same iteration (eval/training_<n>/teacher_backbone.safetensors,
written by a separate code path: a full-state-dict gather of the live teacher), for a 1-rank and a 2-rank (FSDP2
shards) save; damaged checkpoints are clear errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from celldino.hub import load_backbone
from celldino.models.checkpoint import CheckpointError, decode_metadata

TRAIN_TESTS = Path(__file__).resolve().parents[1] / "train"
WORKER = TRAIN_TESTS / "_dist_worker.py"
# 2 iterations: the final one (1) writes both checkpoints/iter_00000001 and eval/training_1
RUN = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "train.batch_size_per_gpu=2"]
ITER_DIR = Path("checkpoints") / "iter_00000001"
EXPORT = Path("eval") / "training_1" / "teacher_backbone.safetensors"


def _tiny_cfg(*overrides):
    sys.path.insert(0, str(TRAIN_TESTS))
    try:
        from train_helpers import tiny_cfg
    finally:
        sys.path.remove(str(TRAIN_TESTS))
    return tiny_cfg(*overrides)


@pytest.fixture(scope="module")
def run_1rank(tmp_path_factory):
    from celldino.train.trainer import run_training
    out = tmp_path_factory.mktemp("run1")
    run_training(_tiny_cfg(*RUN), str(out))
    assert (out / ITER_DIR / ".metadata").is_file() and (out / EXPORT).is_file()
    return out


def _assert_same_as_export(model, export_path):
    exported = load_file(export_path)
    state = model.state_dict()
    assert sorted(state) == sorted(exported)
    for key, value in exported.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def _export_settings(export_path):
    with safe_open(str(export_path), framework="pt") as handle:
        return decode_metadata(handle.metadata())


def test_the_teacher_of_a_checkpoint_directory_is_the_exported_teacher(run_1rank):
    model = load_backbone(run_1rank / ITER_DIR)
    _assert_same_as_export(model, run_1rank / EXPORT)
    # the settings come from meta.json's teacher_backbone (num_heads 2 of the custom width 32 cannot be inferred)
    settings = _export_settings(run_1rank / EXPORT)
    meta = json.loads((run_1rank / ITER_DIR / "meta.json").read_text())
    assert meta["teacher_backbone"]["num_heads"] == 2
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "block_chunks",
                "interpolate_offset", "channel_adaptive"):
        assert model.config[key] == settings[key], key
    assert not model.training
    image = torch.randn(2, 1, 40, 24)
    reference = load_backbone(run_1rank / EXPORT)
    torch.testing.assert_close(model(image), reference(image), rtol=0, atol=0)


def test_only_the_teacher_backbone_is_read(run_1rank, monkeypatch):
    import torch.distributed.checkpoint as dcp
    requested = []
    real_load = dcp.load

    def spy(state_dict, **kwargs):
        requested.extend(state_dict)
        return real_load(state_dict, **kwargs)
    monkeypatch.setattr(dcp, "load", spy)
    load_backbone(run_1rank / ITER_DIR)
    on_disk = dcp.FileSystemReader(str(run_1rank / ITER_DIR)).read_metadata().state_dict_metadata
    teacher = sorted(k for k in on_disk if k.startswith("train.model.teacher.backbone."))
    assert teacher and sorted(requested) == teacher
    assert any(k.startswith("train.optim.") for k in on_disk)  # what was not read


def test_an_older_checkpoint_without_settings_infers_them(run_1rank, tmp_path):
    old = tmp_path / "iter_00000001"
    shutil.copytree(run_1rank / ITER_DIR, old)
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("teacher_backbone")
    (old / "meta.json").write_text(json.dumps(meta))
    # width 32 / depth 2 is no standard arch: the weights cannot tell num_heads
    with pytest.raises(CheckpointError, match=f"{old}: embed_dim 32 / depth 2 .* --num-heads N"):
        load_backbone(old)
    model = load_backbone(old, num_heads=2)
    _assert_same_as_export(model, run_1rank / EXPORT)
    assert model.config["num_heads"] == 2 and model.config["block_chunks"] == 0
    (old / "meta.json").unlink()  # no meta.json at all: the same
    _assert_same_as_export(load_backbone(old, num_heads=2), run_1rank / EXPORT)


def _truncate_shard(path):
    shard = next(path.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(64)


DAMAGE = {
    "truncated shard": (_truncate_shard, "damaged training checkpoint: cannot read the teacher backbone"),
    "missing shard": (lambda p: next(p.glob("*.distcp")).unlink(),
                      "damaged training checkpoint: cannot read the teacher backbone.*No such file"),
    "garbage .metadata": (lambda p: (p / ".metadata").write_bytes(b"not a pickle"),
                          "damaged training checkpoint: cannot read its DCP .metadata"),
    "no .metadata": (lambda p: (p / ".metadata").unlink(),
                     "incomplete training checkpoint directory: shard files .* but no DCP .metadata"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_clear_error(run_1rank, tmp_path, damage):
    broken = tmp_path / "iter_00000001"
    shutil.copytree(run_1rank / ITER_DIR, broken)
    spoil, message = DAMAGE[damage]
    spoil(broken)
    with pytest.raises(CheckpointError, match=f"^{broken}: {message}") as error:
        load_backbone(broken)
    # DCP's own error is a header line + each rank's traceback: the message carries the cause's line instead
    assert "ranks:dict_keys" not in str(error.value) and "Traceback" not in str(error.value)


def test_export_cli_on_a_checkpoint_directory(run_1rank, tmp_path, capsys):
    from celldino.cli import main as celldino
    out = tmp_path / "exported"
    assert celldino(["export", "--checkpoint", str(run_1rank / ITER_DIR), "--output-dir", str(out),
                     "--name", "teacher", "--block-chunks", "0"]) == 0
    assert "exported teacher" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["teacher.pth", "teacher.safetensors"]
    exported = load_file(out / "teacher.safetensors")
    reference = load_file(run_1rank / EXPORT)
    assert sorted(exported) == sorted(reference) and all(torch.equal(exported[k], reference[k]) for k in reference)
    assert _export_settings(out / "teacher.safetensors")["num_heads"] == 2
    # the hub-format .pth loads back to the same teacher with the head count that the .pth cannot record
    _assert_same_as_export(load_backbone(out / "teacher.pth", num_heads=2), run_1rank / EXPORT)


def test_the_checkpoints_folder_or_output_directory_names_its_newest_checkpoint(run_1rank):
    for given in (run_1rank / "checkpoints", run_1rank):
        with pytest.raises(CheckpointError, match=f"^{given} is a directory but not a training checkpoint directory"
                                                  f".*the newest training checkpoint in it is "
                                                  f"{run_1rank / ITER_DIR}$"):
            load_backbone(given)


@pytest.mark.distributed
def test_a_checkpoint_saved_by_two_ranks_loads_in_one_process(tmp_path):
    """2 gloo processes (FSDP2: every parameter's rows split over the ranks) save iter_00000001; one process
    with no process group reassembles the teacher, equal to the one the 2 ranks gathered and exported."""
    from local_ports import communicate_on_a_free_port
    out = tmp_path / "run2"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"overrides": RUN, "output_dir": str(out), "result": str(tmp_path / "result")}))

    def start(port):
        return [subprocess.Popen([sys.executable, str(WORKER), str(spec)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                          LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                          OMP_NUM_THREADS="1"))
                for rank in range(2)]
    outputs = [output for _, output in communicate_on_a_free_port(start, timeout=240)]
    for rank, output in enumerate(outputs):
        # FSDP2 + gloo processes can abort at interpreter exit after a clean run: the result file says done
        if not (tmp_path / f"result.rank{rank}.json").is_file():
            pytest.fail(f"rank {rank} did not finish:\n{output[-4000:]}")
    ckpt = out / ITER_DIR
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert len(list(ckpt.glob("*.distcp"))) == 2
    import torch.distributed.checkpoint as dcp
    chunks = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[
        "train.model.teacher.backbone.blocks.0.mlp.fc1.weight"].chunks
    assert len(chunks) == 2  # really sharded over the two ranks
    assert not torch.distributed.is_initialized()
    _assert_same_as_export(load_backbone(ckpt), out / EXPORT)


def test_recorded_settings_are_read_without_the_weights(run_1rank, monkeypatch):
    """hub.recorded_settings (what eval --config-file compares num_heads with) reads metadata only: the training
    directory's meta.json, the safetensors export's header, and for a teacher_checkpoint.pth the export beside it;
    the weights are never read (they may be gigabytes)."""
    from celldino import hub
    from celldino.models import checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(checkpoint, "read_checkpoint", no_weights)
    monkeypatch.setattr(hub, "load_backbone_state_dict", no_weights)
    expected = _export_settings(run_1rank / EXPORT)
    for source in (run_1rank / ITER_DIR, run_1rank / EXPORT, run_1rank / EXPORT.parent / "teacher_checkpoint.pth"):
        settings = hub.recorded_settings(source)
        assert settings["num_heads"] == expected["num_heads"] == 2 and settings["embed_dim"] == 32, source
