"""train.augmentation: the fused paths (C++ op in the DataLoader workers, or on the training device in the main
process) cut the same crops as the per-sample torch path, batch for batch (same per-sample crop parameters, same
masks), and train; auto picks torch without a CUDA build; bad settings fail early with the key named."""
import numpy as np
import pytest
import torch

from celldino.data import fused_augment
from celldino.train.data import augment_on_device, augmentation_mode, build_train_loader

from train_helpers import tiny_cfg

needs_ext = pytest.mark.skipif(not fused_augment.extension_available(),
                               reason="celldino._C not built (test_fused_augment_build.py fails in that case)")


class Fields(torch.utils.data.Dataset):
    """4-channel uint16 fields of varying sizes with cell-like blobs (so crops and normalisation are non-trivial)."""

    def __init__(self, n=12, same_size=False):
        rng = np.random.default_rng(0)
        self.images = []
        for i in range(n):
            h, w = (44, 50) if same_size else (40 + 3 * i, 52 - i)
            blobs = np.kron(rng.gamma(2.0, 400.0, (4, h // 8 + 1, w // 8 + 1)), np.ones((8, 8)))[:, :h, :w]
            self.images.append(torch.from_numpy(rng.poisson(blobs + 50).astype(np.uint16)))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], 0


def _cfg(mode, *extra):
    return tiny_cfg("student.in_chans=4", "teacher.in_chans=4", f"train.augmentation={mode}", *extra)


def _batches(mode, n=2, num_workers=0, same_size=False):
    cfg = _cfg(mode, f"train.num_workers={num_workers}")
    loader = build_train_loader(cfg, start_iter=1, dataset=Fields(same_size=same_size))
    out = []
    for batch, _ in zip(loader, range(n)):
        out.append(augment_on_device(batch, torch.device("cpu"), torch.float32))
    return out


@needs_ext
@pytest.mark.parametrize("mode,workers,same_size", [("fused_cpu", 0, False), ("fused_cpu", 2, False),
                                                    ("fused_device", 0, False), ("fused_device", 2, True)])
def test_fused_batches_equal_the_torch_batches(mode, workers, same_size):
    """fused_device with workers and equal-size images: the raw images travel as one batch tensor stacked in the
    worker's shared memory."""
    reference = _batches("torch", same_size=same_size)
    fused = _batches(mode, num_workers=workers, same_size=same_size)
    for ref, got in zip(reference, fused):
        assert got["iteration"] == ref["iteration"]
        for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
            assert torch.equal(got[key], ref[key]), key
        assert got["upperbound"] == ref["upperbound"]
        for key in ("collated_global_crops", "collated_local_crops"):
            assert got[key].shape == ref[key].shape and got[key].dtype == ref[key].dtype
            # same crops: only the arithmetic order differs (errors ~1e-6 on self-normalised values of O(1))
            assert (got[key] - ref[key]).abs().max() < 2e-4, key
        assert "crop_params" not in got and "raw_images" not in got


@needs_ext
def test_fused_device_batch_waits_for_the_device_step():
    loader = build_train_loader(_cfg("fused_device"), dataset=Fields())
    batch = next(iter(loader))
    assert batch["raw_images"][0].dtype == torch.uint16 and len(batch["crop_params"]) == 4 * (2 + 2)
    assert "collated_global_crops" not in batch
    assert isinstance(batch["raw_images"], list)  # sizes differ: one tensor per image
    same = next(iter(build_train_loader(_cfg("fused_device", "train.num_workers=2"), dataset=Fields(same_size=True))))
    assert same["raw_images"].shape == (4, 4, 44, 50)  # equal sizes: one batch tensor (one pinned copy to the GPU)
    done = augment_on_device(batch, torch.device("cpu"), torch.bfloat16)
    assert done["collated_global_crops"].dtype == torch.bfloat16
    assert done["collated_global_crops"].shape == (8, 4, 32, 32) and done["collated_local_crops"].shape == (8, 4, 16, 16)


@needs_ext
def test_training_with_fused_device_matches_torch_augmentation(tmp_path):
    from celldino.train.trainer import Trainer

    histories = {}
    for mode in ("torch", "fused_device"):
        trainer = Trainer(_cfg(mode, "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3"), tmp_path / mode)
        try:
            histories[mode] = trainer.run(data=_loader_for(trainer))["loss_history"]
        finally:
            trainer.close()
    assert [i for i, _ in histories["fused_device"]] == [i for i, _ in histories["torch"]]
    for (_, a), (_, b) in zip(histories["fused_device"], histories["torch"]):
        assert a == pytest.approx(b, rel=1e-3)


def _loader_for(trainer):
    return build_train_loader(trainer.cfg, trainer.start_iter, dataset=Fields(), device=trainer.device,
                              dtype=trainer.plan.input_dtype)


def test_auto_and_bad_settings():
    cpu = torch.device("cpu")
    assert augmentation_mode(_cfg("auto"), cpu) == "torch"
    with pytest.raises(ValueError, match="train.augmentation: expected one of"):
        augmentation_mode(_cfg("gpu"), cpu)
    with pytest.raises(ValueError, match="needs train.cell_augmentation=true"):
        augmentation_mode(_cfg("fused_cpu", "train.cell_augmentation=false"), cpu)


@pytest.mark.gpu
@needs_ext
def test_fused_device_on_cuda_equals_the_cpu_op():
    if not fused_augment.cuda_extension_available():
        pytest.skip("celldino._C built without CUDA")
    loader = build_train_loader(_cfg("fused_device"), dataset=Fields(), device=torch.device("cuda"))
    batch = next(iter(loader))
    on_cpu = augment_on_device(dict(batch), torch.device("cpu"), torch.float32)
    on_gpu = augment_on_device(batch, torch.device("cuda"), torch.float32)
    for key in ("collated_global_crops", "collated_local_crops"):
        assert on_gpu[key].is_cuda
        assert (on_gpu[key].cpu() - on_cpu[key]).abs().max() < 1e-4, key
