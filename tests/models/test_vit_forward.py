"""Forward equivalence of DinoVisionTransformer against the independent float64 re-computation in
reference_vit.py: training size and other resolutions (pos-embed interpolation), masks, registers, chunking,
the packed multi-crop path, intermediate layers and bag of channels."""
import pytest
import torch

import celldino.models.layers.attention as attention_module
import reference_vit as ref
from celldino.models import vit_small

HEADS = 4


def tiny(patch=16, img_size=224, registers=0, chunks=0, in_chans=4, ffn_layer="mlp", **kwargs):
    """A small ViT with every parameter randomised (LayerScale, norms and mask_token included), so that each
    part of the computation changes the output."""
    model = vit_small(patch_size=patch, img_size=img_size, embed_dim=64, depth=4, num_heads=HEADS,
                      in_chans=in_chans, num_register_tokens=registers, block_chunks=chunks, init_values=1.0,
                      ffn_layer=ffn_layer, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias") or name == "mask_token":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen))  # large, so interpolation errors would show
            else:
                p.mul_(3.0)  # sharper attention than the 0.02 init
    return model.eval()


def check_against_reference(model, x, masks=None, offset=0.1, antialias=False):
    sd = model.state_dict()
    normed, prenorm, _ = ref.forward(sd, x, HEADS, masks, offset, antialias)
    r = model.num_register_tokens
    out64 = model.double().forward_features(x.double(), masks)
    torch.testing.assert_close(out64["x_prenorm"], prenorm, rtol=0, atol=1e-9)
    torch.testing.assert_close(out64["x_norm_clstoken"], normed[:, 0], rtol=0, atol=1e-9)
    torch.testing.assert_close(out64["x_norm_regtokens"], normed[:, 1:1 + r], rtol=0, atol=1e-9)
    torch.testing.assert_close(out64["x_norm_patchtokens"], normed[:, 1 + r:], rtol=0, atol=1e-9)
    out32 = model.float().forward_features(x, masks)
    torch.testing.assert_close(out32["x_norm_patchtokens"].double(), normed[:, 1 + r:], rtol=0, atol=2e-4)
    torch.testing.assert_close(model(x, masks).double(), normed[:, 0], rtol=0, atol=2e-4)  # forward = normed CLS


CASES = [  # (patch, training img_size, registers, block_chunks, input sizes)
    (16, 224, 0, 0, [(224, 224), (96, 96), (384, 384), (160, 224), (112, 448)]),  # 112x448: 196 tokens, not square
    (16, 224, 2, 2, [(224, 224), (96, 160)]),
    (14, 224, 1, 4, [(224, 224), (98, 98), (154, 98)]),
    (8, 128, 0, 2, [(128, 128), (96, 96), (64, 96)]),
]


@pytest.mark.parametrize("patch,img_size,registers,chunks,sizes", CASES, ids=["p16", "p16-reg-chunk", "p14", "p8"])
def test_forward_matches_float64_reference(patch, img_size, registers, chunks, sizes):
    model = tiny(patch, img_size, registers, chunks)
    for h, w in sizes:
        check_against_reference(model, torch.randn(1 if h * w > 224 * 224 else 2, 4, h, w))


@pytest.mark.parametrize("offset,antialias", [(0.0, False), (0.0, True), (0.1, True)])
def test_interpolation_variants(offset, antialias):
    model = tiny(16, 224, interpolate_offset=offset, interpolate_antialias=antialias)
    for h, w in [(96, 96), (160, 224), (384, 384)]:
        check_against_reference(model, torch.randn(2, 4, h, w), offset=offset, antialias=antialias)


def test_interpolation_offset_matters():
    """offset 0.1 (scale_factor) and 0 (size) give different pos embeddings at 96 px: the semantics are pinned."""
    a = tiny(16, 224, interpolate_offset=0.1).double()
    b = tiny(16, 224, interpolate_offset=0.0).double()
    x = torch.randn(1, 4, 96, 96, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_swiglu_forward():
    model = tiny(16, 64, ffn_layer="swiglufused")
    check_against_reference(model, torch.randn(2, 4, 64, 80))


def test_masked_tokens():
    model = tiny(16, 224, registers=1)
    x = torch.randn(3, 4, 224, 224)
    masks = torch.rand(3, 196) < 0.4
    check_against_reference(model, x, masks=masks)
    out = model.float().forward_features(x, masks)
    assert out["masks"] is masks
    assert (out["x_norm_patchtokens"] - model.forward_features(x)["x_norm_patchtokens"]).abs().max() > 1e-3


def test_packed_list_equals_separate_forwards(monkeypatch):
    model = tiny(16, 224, registers=2, chunks=2)
    calls = []
    real = attention_module.multicrop_attention

    def counting(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
        calls.append((tuple(q.shape), [int(c) for c in cu_seqlens], max_seqlen))
        return real(q, k, v, cu_seqlens, max_seqlen, scale)

    monkeypatch.setattr(attention_module, "multicrop_attention", counting)
    glob, loc = torch.randn(4, 4, 224, 224), torch.randn(6, 4, 96, 96)
    masks = torch.rand(4, 196) < 0.3
    outs = model.forward_features_list([glob, loc], [masks, None])
    # one attention call per block on the whole stream: 4 x (1+2+196) + 6 x (1+2+36) tokens
    total = 4 * 199 + 6 * 39
    assert len(calls) == 4
    assert all(c[0] == (total, HEADS, 16) for c in calls)
    assert calls[0][1] == [0] + [199 * i for i in range(1, 5)] + [4 * 199 + 39 * i for i in range(1, 7)]
    assert calls[0][2] == 199
    for out, x, m in zip(outs, (glob, loc), (masks, None)):
        single = model.forward_features(x, m)
        assert out["masks"] is m
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[key], single[key], rtol=1e-5, atol=1e-5)


def test_packed_list_gradients_equal_separate():
    model = tiny(16, 64, registers=1)
    xs = [torch.randn(3, 4, 64, 64), torch.randn(5, 4, 32, 32)]
    weights = [torch.randn(3, 64), torch.randn(5, 64)]
    packed = model.forward_features_list(xs, [None, None])
    sum((o["x_norm_clstoken"] * w).sum() for o, w in zip(packed, weights)).backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum((model.forward_features(x)["x_norm_clstoken"] * w).sum() for x, w in zip(xs, weights)).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads_packed[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert set(grads_packed) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_nested_block_list_api():
    """Block(list) (the reference NestedTensorBlock API) == Block on each tensor."""
    model = tiny(16, 64)
    block = next(model.iter_blocks())
    xs = [torch.randn(2, 17, 64), torch.randn(3, 5, 64)]
    for out, x in zip(block(xs), xs):
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [0, 2])
def test_get_intermediate_layers(chunks):
    model = tiny(16, 224, registers=2, chunks=chunks).double()
    x = torch.randn(2, 4, 96, 128, dtype=torch.float64)
    _, _, per_block = ref.forward(model.state_dict(), x, HEADS)
    sd = model.state_dict()

    def norm(t):
        return ref.layer_norm(t, sd["norm.weight"], sd["norm.bias"])

    out = model.get_intermediate_layers(x, n=2)
    assert len(out) == 2
    for got, want in zip(out, per_block[2:]):
        torch.testing.assert_close(got, norm(want)[:, 3:], rtol=0, atol=1e-9)
    out = model.get_intermediate_layers(x, n=[2, 0], return_class_token=True, norm=False)
    for (patches, cls), want in zip(out, [per_block[0], per_block[2]]):  # block order, as the reference
        torch.testing.assert_close(patches, want[:, 3:], rtol=0, atol=1e-9)
        torch.testing.assert_close(cls, want[:, 0], rtol=0, atol=1e-9)
    (grid,) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert grid.shape == (2, 64, 6, 8)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), norm(per_block[3])[:, 3:], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="requested blocks"):
        model.get_intermediate_layers(x, n=[1, 7])


def test_bag_of_channels_intermediate_layers():
    model = tiny(16, 224, in_chans=1, channel_adaptive=True)
    x = torch.randn(2, 3, 64, 96)
    out = model.get_intermediate_layers(x, n=2)
    assert len(out) == 2
    for block, (patches, cls) in enumerate(out):
        assert patches.shape == (2, 3, 24, 64) and cls.shape == (2, 3 * 64)
        for c in range(3):  # each channel is encoded on its own as a 1-channel image
            model.bag_of_channels = False
            single = model.get_intermediate_layers(x[:, c:c + 1], n=2, return_class_token=True)[block]
            model.bag_of_channels = True
            torch.testing.assert_close(patches[:, c], single[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cls[:, c * 64:(c + 1) * 64], single[1], rtol=1e-5, atol=1e-5)
    ((grid, cls),) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert grid.shape == (2, 3, 64, 4, 6) and cls.shape == (2, 192)
    torch.testing.assert_close(grid.flatten(3).transpose(2, 3), out[1][0], rtol=1e-6, atol=1e-6)


def test_forward_is_training_returns_dict():
    model = tiny(16, 64)
    x = torch.randn(2, 4, 64, 64)
    out = model(x, is_training=True)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    torch.testing.assert_close(model(x), out["x_norm_clstoken"])
