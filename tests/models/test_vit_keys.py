"""State-dict keys and shapes of every arch x patch x registers x chunking, against the key lists of the spec
(reference_spec.md §4.1). Models are built on the meta device: no memory, no init cost."""
import pytest
import torch
import torch.nn.functional as F

from celldino.models import vit_base, vit_giant2, vit_large, vit_small
from reference_vit import spec_keys

ARCH = {"vit_small": (vit_small, 384, 12), "vit_base": (vit_base, 768, 12), "vit_large": (vit_large, 1024, 24),
        "vit_giant2": (vit_giant2, 1536, 40)}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", list(ARCH))
@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("chunks", [0, 4])
def test_state_dict_keys_match_spec(arch, patch, registers, chunks):
    builder, dim, depth = ARCH[arch]
    img = {8: 128, 14: 518, 16: 224}[patch]
    with torch.device("meta"):
        model = builder(patch_size=patch, img_size=img, in_chans=4, num_register_tokens=registers,
                        block_chunks=chunks, init_values=1.0)
    assert shapes(model) == spec_keys(dim, depth, patch, 4, img, registers, chunks)
    assert model.embed_dim == dim and model.n_blocks == depth and model.patch_size == patch


def test_vitl_four_chunks_spelled_out():
    """Spec example: ViT-L with block_chunks=4 -> blocks.0.0-0.5, 1.6-1.11, 2.12-2.17, 3.18-3.23."""
    with torch.device("meta"):
        model = vit_large(patch_size=16, in_chans=4, block_chunks=4, init_values=1.0)
    present = {tuple(int(p) for p in k.split(".")[1:3]) for k in model.state_dict() if k.startswith("blocks.")}
    assert present == {(c, i) for c, lo in enumerate((0, 6, 12, 18)) for i in range(lo, lo + 6)}
    assert "blocks.1.6.attn.qkv.weight" in model.state_dict() and "blocks.0.6.attn.qkv.weight" not in model.state_dict()
    assert model.state_dict()["pos_embed"].shape == (1, 197, 1024)
    assert len(model.blocks) == 4 and len(model.blocks[3]) == 24  # 18 Identity placeholders + 6 blocks


def test_no_layerscale_swiglu_no_registers():
    with torch.device("meta"):
        model = vit_small(patch_size=14, img_size=224, ffn_layer="swiglufused", init_values=None, block_chunks=0)
    assert shapes(model) == spec_keys(384, 12, 14, 3, 224, 0, 0, layerscale=False, ffn="swiglu")
    with torch.device("meta"):
        swiglu = vit_small(patch_size=14, img_size=224, ffn_layer="swiglu", init_values=None, block_chunks=0)
    assert shapes(swiglu) == shapes(model)  # the reference maps "swiglu" to the fused-width SwiGLU too


@pytest.mark.parametrize("in_chans", [1, 3, 5, 7])
def test_in_chans(in_chans):
    model = vit_small(patch_size=16, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2, img_size=32)
    assert model.state_dict()["patch_embed.proj.weight"].shape == (32, in_chans, 16, 16)
    assert model(torch.randn(2, in_chans, 32, 48)).shape == (2, 32)
    with pytest.raises(ValueError, match=f"expects {in_chans} input channels"):
        model(torch.randn(2, in_chans + 1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(2, in_chans, 33, 32))


def test_reference_init():
    torch.manual_seed(0)
    model = vit_small(patch_size=16, embed_dim=192, depth=2, num_heads=3, num_register_tokens=2, init_values=1e-5,
                      block_chunks=0)
    sd = model.state_dict()
    assert torch.all(sd["mask_token"] == 0)
    assert sd["cls_token"].std() < 1e-5 and sd["register_tokens"].std() < 1e-5 and sd["cls_token"].abs().max() > 0
    assert abs(sd["pos_embed"].std().item() - 0.02) < 0.002 and sd["pos_embed"].abs().max() <= 2.0
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.0.attn.proj.weight"):
        assert abs(sd[key].std().item() - 0.02) < 0.002
    for key in ("blocks.0.attn.qkv.bias", "blocks.1.mlp.fc2.bias"):
        assert torch.all(sd[key] == 0)
    assert torch.all(sd["blocks.0.ls1.gamma"] == 1e-5)
    assert torch.all(sd["norm.weight"] == 1) and torch.all(sd["norm.bias"] == 0)


def test_drop_path_rates():
    uniform = vit_small(embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.3, drop_path_uniform=True)
    decay = vit_small(embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.3, drop_path_uniform=False)
    assert [b.sample_drop_ratio for b in uniform.iter_blocks()] == [0.3] * 4
    assert [b.sample_drop_ratio for b in decay.iter_blocks()] == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("in_chans,patch,size", [(4, 16, (64, 48)), (5, 14, (28, 42)), (3, 8, (8, 8))])
def test_patch_embed_equals_the_reference_conv2d(in_chans, patch, size):
    """PatchEmbed unfolds patches into one GEMM; the reference is a strided Conv2d with the same weight: equal in
    float64, and so are the weight and bias gradients."""
    from celldino.models.layers.patch_embed import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(img_size=size, patch_size=patch, in_chans=in_chans, embed_dim=24).double()
    x = torch.randn(3, in_chans, *size, dtype=torch.float64)
    got = embed(x)
    want = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (embed.proj.weight, embed.proj.bias), grad)
    want_grads = torch.autograd.grad(
        F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=patch).flatten(2).transpose(1, 2),
        (embed.proj.weight, embed.proj.bias), grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
