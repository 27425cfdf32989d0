"""Feature extraction against direct model calls (reference_spec.md §6.1, §6.2): CLS, linear-probe input,
bag of channels, mixed image sizes, the resumable chunk cache and 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from celldino.eval.features import FeatureModel, FeatureOptions, autocast_dtype_for, extract_features, linear_input

from eval_helpers import TensorItems, tiny_vit
from gloo_ranks import init_gloo


def _images(n, c=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, size, size, generator=g) for _ in range(n)]


def test_auto_autocast_is_fp16_on_gpu_and_none_on_cpu():
    """The one rule of feature extraction and the linear protocol's augmented batches (the reference's fp16 eval)."""
    assert autocast_dtype_for("cpu") is None and autocast_dtype_for(torch.device("cpu"), "auto") is None
    assert autocast_dtype_for("cuda:1", "auto") is torch.float16  # a device name: no GPU needed
    assert autocast_dtype_for("cpu", "bf16") is torch.bfloat16 and autocast_dtype_for("cuda", "fp32") is torch.float32
    assert autocast_dtype_for("cuda", None) is None
    with pytest.raises(ValueError, match="expected fp16, bf16 or fp32"):
        autocast_dtype_for("cpu", "int8")


def test_cls_and_knn_features_equal_the_model_output(tiny_model):
    images = _images(11)
    ds = TensorItems(images, list(range(11)))
    got = extract_features(tiny_model, ds, batch_size=4, progress=False)
    with torch.no_grad():
        expected = torch.cat([tiny_model(img[None]) for img in images])
    torch.testing.assert_close(got.features, expected, atol=1e-5, rtol=1e-5)
    assert got.labels.tolist() == list(range(11))
    knn = extract_features(tiny_model, ds, kind="knn", batch_size=5, progress=False)
    torch.testing.assert_close(knn.features, torch.nn.functional.normalize(expected, dim=1), atol=1e-5, rtol=1e-5)


def test_linear_input_from_forward_features(tiny_model):
    x = torch.stack(_images(3))
    with torch.no_grad():
        ff = tiny_model.forward_features(x)
        feats = FeatureModel(tiny_model, FeatureOptions(kind="linear", n_last_blocks=1, avgpool=True))(x)
        feats3 = FeatureModel(tiny_model, FeatureOptions(kind="linear", n_last_blocks=3, avgpool=False))(x)
    expected = torch.cat([ff["x_norm_clstoken"], ff["x_norm_patchtokens"].mean(1)], dim=1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    assert feats3.shape == (3, 3 * 32)
    torch.testing.assert_close(feats3[:, -32:], ff["x_norm_clstoken"], atol=1e-5, rtol=1e-5)  # last block last


def test_bag_of_channels_is_per_channel_encoding():
    one_channel = tiny_vit(in_chans=1, seed=1)
    x = torch.stack(_images(2, c=3))
    with torch.no_grad():
        per_channel = [one_channel.forward_features(x[:, c:c + 1]) for c in range(3)]
        cls = torch.cat([p["x_norm_clstoken"] for p in per_channel], dim=1)
        pooled = torch.cat([p["x_norm_patchtokens"].mean(1) for p in per_channel], dim=1)
        ours = FeatureModel(one_channel, FeatureOptions(kind="linear", avgpool=True, bag_of_channels=True))(x)
        knn = FeatureModel(one_channel, FeatureOptions(kind="knn", bag_of_channels=True))(x)
        # the same weights flagged channel_adaptive do the reshaping inside the model
        adaptive = tiny_vit(in_chans=1, seed=1, channel_adaptive=True)
        adaptive.load_state_dict(one_channel.state_dict())
        theirs = FeatureModel(adaptive, FeatureOptions(kind="linear", avgpool=True))(x)
    torch.testing.assert_close(ours, torch.cat([cls, pooled], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(knn, torch.nn.functional.normalize(cls, dim=1), atol=1e-5, rtol=1e-5)
    assert ours.shape == (2, 3 * 32 * 2)


def test_linear_input_reference_layout():
    # two blocks, B=2, N=3 tokens, D=2: CLS of the blocks concatenated, then the mean of the last patch tokens
    p1, p2 = torch.arange(12.).reshape(2, 3, 2), torch.arange(12., 24.).reshape(2, 3, 2)
    c1, c2 = torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[5., 6.], [7., 8.]])
    out = linear_input([(p1, c1), (p2, c2)], n_last_blocks=2, avgpool=True)
    assert out.tolist() == [[1, 2, 5, 6, 14, 15], [3, 4, 7, 8, 20, 21]]


def test_mixed_image_sizes_and_channel_errors(tiny_model):
    images = [torch.randn(2, s, s) for s in (32, 48, 32, 16, 48, 32)]
    got = extract_features(tiny_model, TensorItems(images, [0] * 6), batch_size=4, progress=False)
    with torch.no_grad():
        expected = torch.cat([tiny_model(img[None]) for img in images])
    torch.testing.assert_close(got.features, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="3 channels but the model expects 2"):
        extract_features(tiny_model, TensorItems([torch.randn(3, 32, 32)], [0]), progress=False)
    with pytest.raises(ValueError, match="one-channel backbone"):
        FeatureModel(tiny_model, FeatureOptions(bag_of_channels=True))


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0
        self.config = model.config

    def forward(self, x):
        self.calls += x.shape[0]
        return self.model(x)


def test_cache_is_resumable_and_checked(tmp_path, tiny_model):
    images = _images(10)
    ds = TensorItems(images, [i % 3 for i in range(10)])
    counting = _CountingModel(tiny_model)
    first = extract_features(counting, ds, batch_size=2, cache_dir=str(tmp_path), chunk_size=4, progress=False)
    assert counting.calls == 10
    chunk_files = sorted(p for p in os.listdir(tmp_path) if p.startswith("chunk_"))
    assert len(chunk_files) == 3 and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    os.remove(tmp_path / chunk_files[1])  # an interrupted run: items 4..7 missing
    counting.calls = 0
    again = extract_features(counting, ds, batch_size=2, cache_dir=str(tmp_path), chunk_size=4, progress=False)
    assert counting.calls == 4
    assert torch.equal(again.features, first.features) and torch.equal(again.labels, first.labels)
    with pytest.raises(ValueError, match="another run"):
        extract_features(counting, ds, kind="knn", batch_size=2, cache_dir=str(tmp_path), chunk_size=4, progress=False)


def _worker(rank, world, store_file, state, images, targets, cache, queue):
    init_gloo(rank, world, store_file)
    try:
        model = tiny_vit()
        model.load_state_dict(state)
        ds = TensorItems(images, targets)
        plain = extract_features(model, ds, kind="linear", avgpool=True, batch_size=3, progress=False)
        cached = extract_features(model, ds, batch_size=2, cache_dir=cache, chunk_size=3, progress=False)
        # numpy travels by value (a tensor would be shared memory that dies with this process)
        queue.put((rank, plain.features.numpy(), plain.labels.numpy(), cached.features.numpy(), cached.labels.numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_shard_and_gather(tmp_path, tiny_model):
    images, targets = _images(11), [[i % 2, 1 - i % 2, 1] for i in range(11)]  # multi-hot targets
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = (tiny_model.state_dict(), images, targets, str(tmp_path / "cache"), queue)
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "gloo_store")) + args) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((item[0], item[1:]) for item in (queue.get(timeout=180) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    ds = TensorItems(images, targets)
    plain = extract_features(tiny_model, ds, kind="linear", avgpool=True, progress=False)
    cls = extract_features(tiny_model, ds, progress=False)
    for rank in range(2):
        f, y, fc, yc = (torch.from_numpy(a) for a in results[rank])
        torch.testing.assert_close(f, plain.features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fc, cls.features, atol=1e-5, rtol=1e-5)
        assert torch.equal(y, torch.tensor(targets)) and torch.equal(yc, torch.tensor(targets))
