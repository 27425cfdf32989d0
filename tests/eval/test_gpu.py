"""GPU twins of the CPU-tested evaluation paths (skipped without CUDA)."""
import pytest
import torch

from celldino.eval.features import extract_features
from celldino.eval.knn import knn_scores, knn_search
from celldino.eval.linear import linear_probe_on_features

from eval_helpers import TensorItems, tiny_vit

pytestmark = pytest.mark.gpu


def test_knn_cuda_equals_cpu_and_bf16_recall():
    torch.manual_seed(0)
    train, test = torch.randn(5000, 64), torch.randn(300, 64)
    train[100:120] = train[0:20]  # exact ties
    labels = torch.randint(0, 7, (5000,))
    v_cpu, i_cpu = knn_search(train, test, 25, device="cpu")
    v_gpu, i_gpu = knn_search(train, test, 25, device="cuda", train_chunk=1024, query_chunk=64)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-5, rtol=0)
    s_cpu = knn_scores(train, labels, test, [1, 10, 25], 0.07, 7, device="cpu")
    s_gpu = knn_scores(train, labels, test, [1, 10, 25], 0.07, 7, device="cuda")
    for k in s_cpu:
        torch.testing.assert_close(s_gpu[k], s_cpu[k], atol=1e-4, rtol=0)
    _, i_bf16 = knn_search(train, test, 25, device="cuda", dtype=torch.bfloat16)
    recall = (i_bf16.cpu().unsqueeze(2) == i_cpu.unsqueeze(1)).any(2).float().mean()
    assert recall > 0.9


def test_features_fp16_autocast_close_to_fp32():
    model = tiny_vit(in_chans=2)
    g = torch.Generator().manual_seed(0)
    ds = TensorItems([torch.randn(2, 32, 32, generator=g) for _ in range(20)], list(range(20)))
    ref = extract_features(model, ds, device="cpu", progress=False).features
    got = extract_features(model, ds, device="cuda", autocast_dtype="fp16", batch_size=8, progress=False).features
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() > 0.999


def test_linear_probe_on_cuda():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)
    x = torch.randn(600, 16, generator=g)
    y = (x @ w).argmax(1)
    out = linear_probe_on_features(x[:400], y[:400], x[400:], y[400:], learning_rates=[0.05, 1.0],
                                   weight_decays=[0.0], epochs=3, epoch_length=50, device="cuda", progress=False)
    assert out["heads"].weight.is_cuda and out["val"] > 0.85
