"""Checkpoint files on their own (one process, a small module): an unreadable newest checkpoint falls back to the
previous one, and what an interrupted save leaves behind is cleaned up without losing a complete checkpoint."""
import logging
import os

import pytest
import torch

from celldino.train.checkpointing import (NoUsableCheckpointError, TrainState, clean_partial_saves, list_checkpoints,
                                          load_latest, save_checkpoint)


def _state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return TrainState(model, optimizer)


def _saved_run(tmp_path):
    for iteration, seed in ((3, 1), (7, 2)):
        save_checkpoint(tmp_path, iteration, _state(seed), keep=3)
    return {it: path for it, path in list_checkpoints(tmp_path)}


def _distcp(path):
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


@pytest.mark.parametrize("damage", ["truncate", "delete_data", "empty_metadata", "bad_meta_json"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    saved = _saved_run(tmp_path)
    newest = saved[7]
    if damage == "truncate":
        data = _distcp(newest)
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "delete_data":
        _distcp(newest).unlink()
    elif damage == "empty_metadata":
        (newest / ".metadata").write_bytes(b"")
    else:
        (newest / "meta.json").write_text("{")
    state = _state(0)
    with caplog.at_level(logging.ERROR, logger="celldino"):
        iteration, path = load_latest(tmp_path, state)
    assert (iteration, path) == (3, saved[3])
    assert f"cannot load checkpoint {newest}" in caplog.text
    # the cause, not DCP's "CheckpointException ranks:dict_keys([0])" header
    cause = {"truncate": "on rank 0: ", "delete_data": "FileNotFoundError", "empty_metadata": "Error",
             "bad_meta_json": "JSONDecodeError"}[damage]
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "celldino")  # (not DCP's own debug log)
    assert cause in ours and "ranks:dict_keys" not in ours
    expected = _state(1).model.weight
    assert torch.equal(state.model.weight, expected)


def test_no_loadable_checkpoint_is_a_clear_error(tmp_path):
    for path in _saved_run(tmp_path).values():
        _distcp(path).unlink()
    with pytest.raises(NoUsableCheckpointError, match="none of the checkpoints under .* could be loaded"):
        load_latest(tmp_path, _state(0))


def test_interrupted_saves_are_cleaned_up_and_a_moved_aside_checkpoint_is_restored(tmp_path, caplog):
    saved = _saved_run(tmp_path)
    root = saved[7].parent
    # killed between "iter_7 -> .old-iter_7" and ".tmp-iter_7 -> iter_7" while saving iteration 7 again
    os.replace(saved[7], root / ".old-iter_00000007")
    (root / ".tmp-iter_00000007").mkdir()
    # killed in the middle of a new save, and a checkpoint directory missing its metadata
    (root / ".tmp-iter_00000011").mkdir()
    (root / "iter_00000009").mkdir()
    with caplog.at_level(logging.WARNING, logger="celldino"):
        clean_partial_saves(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["iter_00000003", "iter_00000007", "iter_00000009"]
    assert "restoring iter_00000007" in caplog.text and "ignoring incomplete checkpoint" in caplog.text
    iteration, _ = load_latest(tmp_path, _state(0))
    assert iteration == 7


def _shared_check(rank, world, shared, private):
    """Rank 1 looks at its own private copy of the directory when `private` is set (a node-local disk)."""
    from celldino.train import distributed
    if private and rank == 1:
        import os.path
        real_exists = os.path.exists
        os.path.exists = lambda p: False if ".celldino-shared-" in str(p) else real_exists(p)
    try:
        distributed.check_shared_directory(shared)
        return "ok"
    except ValueError as exc:
        return str(exc)


@pytest.mark.distributed
def test_an_output_directory_not_shared_by_every_rank_is_refused_at_start(tmp_path):
    from gloo_ranks import run_on_gloo_ranks
    ok = run_on_gloo_ranks(_shared_check, (str(tmp_path), False), tmp_path / "store1")
    assert ok == {0: "ok", 1: "ok"} and not list(tmp_path.glob(".celldino-shared-*"))
    bad = run_on_gloo_ranks(_shared_check, (str(tmp_path), True), tmp_path / "store2")
    for message in bad.values():
        assert "rank(s) [1] cannot see a file rank 0 wrote there" in message
    assert not list(tmp_path.glob(".celldino-shared-*"))
