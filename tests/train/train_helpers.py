"""Helpers shared by the trainer tests (a plain module, not a conftest: several test folders have a conftest.py).

Tiny configs: a 2-block ViT on 32 px global / 16 px local crops of the bundled
real 16-bit sample cells, small heads: a training step takes well under a second on one CPU core."""
from pathlib import Path


SAMPLE_CSV = Path(__file__).resolve().parents[2] / "data" / "sample" / "stain_task" / "stain_task.csv"

TINY = [
    "student.arch=vit_small", "student.patch_size=8", "student.in_chans=1", "student.embed_dim=32",
    "student.depth=2", "student.num_heads=2", "student.drop_path_rate=0.0", "student.block_chunks=0",
    "teacher.in_chans=1",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "crops.global_crops_scale=[0.4,1.0]", "crops.local_crops_scale=[0.1,0.4]",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.cell_augmentation=true",
    f"train.dataset_path=CSV:path={SAMPLE_CSV}", "train.OFFICIAL_EPOCH_LENGTH=4", "train.log_period=2",
    "optim.epochs=2", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
    "evaluation.eval_period_iterations=4", "train.device=cpu",
]


def tiny_cfg(*overrides):
    from celldino.config import load_config
    return load_config(None, TINY + list(overrides))
