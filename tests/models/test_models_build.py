"""build_model / build_model_from_cfg from the shipped recipes (reference dinov2.models.build_model semantics)."""
import torch

from celldino.config import load_config
from celldino.models import build_model, build_model_from_cfg
from reference_vit import spec_keys


def test_hpaone_recipe_builds_reference_vitl16():
    cfg = load_config("cell_dino/vitl16_hpaone")
    with torch.device("meta"):
        student, teacher, embed_dim = build_model_from_cfg(cfg)
    assert embed_dim == 1024
    expected = spec_keys(1024, 24, 16, 4, 224, registers=0, chunks=4, layerscale=True)
    for model in (student, teacher):
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert [b.sample_drop_ratio for b in student.iter_blocks()] == [0.1] * 24  # drop_path_uniform
    assert [b.sample_drop_ratio for b in teacher.iter_blocks()] == [0.0] * 24
    assert student.interpolate_offset == 0.1 and not student.interpolate_antialias


def test_only_teacher_and_overrides():
    cfg = load_config("ssl_default_config", ["student.arch=vit_small", "student.embed_dim=48", "student.depth=3",
                                             "student.num_heads=3", "student.in_chans=2", "student.patch_size=8",
                                             "crops.global_crops_size=32", "student.layerscale=0.5",
                                             "student.num_register_tokens=2", "student.drop_path_uniform=false"])
    teacher, embed_dim = build_model_from_cfg(cfg, only_teacher=True)
    assert embed_dim == 48 and teacher.num_heads == 3 and teacher.n_blocks == 3
    assert teacher.pos_embed.shape == (1, 17, 48) and teacher.register_tokens.shape == (1, 2, 48)
    assert torch.all(next(teacher.iter_blocks()).ls1.gamma == 0.5)
    student, _, _ = build_model(cfg.student, img_size=32)
    assert [b.sample_drop_ratio for b in student.iter_blocks()] == [0.0, 0.15, 0.3]
    assert student(torch.randn(1, 2, 32, 32)).shape == (1, 48)


def test_arch_of_names_the_standard_sizes_only():
    from celldino.models.vision_transformer import ARCHS, arch_of
    for name, dims in ARCHS.items():
        assert arch_of(dims["embed_dim"], dims["depth"]) == name
        assert arch_of(dims["embed_dim"], dims["depth"], dims["num_heads"]) == name
        assert arch_of(dims["embed_dim"], dims["depth"], dims["num_heads"] + 1) is None
    assert arch_of(32, 2) is None
