"""DINOHead: reference keys (mlp.0/2/4, last_layer.weight_g / weight_v), init, math against a hand computation,
and loading a state dict produced by a reference-style head built with torch's hook-based weight_norm."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from celldino.models import DINOHead
from celldino.models.head import WeightNormLinear


def reference_style_head(in_dim, out_dim, hidden, bottleneck):
    """What the reference builds: Linear/GELU MLP, then torch.nn.utils.weight_norm(Linear(no bias))."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                        nn.Linear(hidden, bottleneck))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        last = torch.nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    last.weight_g.data.uniform_(0.5, 2.0)
    return mlp, last


def test_keys_and_shapes():
    head = DINOHead(64, 1000, hidden_dim=128, bottleneck_dim=32)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (128, 64), "mlp.0.bias": (128,), "mlp.2.weight": (128, 128),
                      "mlp.2.bias": (128,), "mlp.4.weight": (32, 128), "mlp.4.bias": (32,),
                      "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 32)}
    assert [n for n, _ in head.named_parameters() if "last_layer" in n] == ["last_layer.weight_g",
                                                                              "last_layer.weight_v"]
    assert set(DINOHead(8, 10, nlayers=1, bottleneck_dim=4).state_dict()) == {
        "mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}
    assert "mlp.0.bias" not in DINOHead(8, 10, mlp_bias=False, hidden_dim=6, bottleneck_dim=4).state_dict()


def test_init():
    torch.manual_seed(0)
    head = DINOHead(256, 4096, hidden_dim=512, bottleneck_dim=128)
    assert torch.all(head.last_layer.weight_g == 1)
    for i in (0, 2, 4):
        assert abs(head.mlp[i].weight.std().item() - 0.02) < 0.002
        assert torch.all(head.mlp[i].bias == 0)
    # weight_v keeps nn.Linear's default init (kaiming uniform: bound 1/sqrt(fan_in)), as the reference
    v = head.last_layer.weight_v
    assert v.abs().max() <= 1 / 128 ** 0.5 and v.std() > 0.5 / (3 * 128) ** 0.5


def test_forward_matches_hand_computation():
    head = DINOHead(16, 50, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(7, 16, dtype=torch.float64)
    sd = {k: v.double() for k, v in head.state_dict().items()}
    h = F.gelu(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    h = F.gelu(h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    z = h @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]
    z = z / z.norm(dim=1, keepdim=True)
    v = sd["last_layer.weight_v"]
    w = sd["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.double()(x), z @ w.T, rtol=0, atol=1e-12)


def test_loads_reference_weight_norm_state_dict_and_matches_its_output():
    mlp, last = reference_style_head(16, 40, 24, 8)
    ref_sd = {**{f"mlp.{k}": v for k, v in mlp.state_dict().items()},
              **{f"last_layer.{k}": v for k, v in last.state_dict().items()}}
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(ref_sd, strict=True)
    x = torch.randn(5, 16)
    want = last(F.normalize(mlp(x), dim=-1, eps=1e-12))
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-6)
    # and back: our state dict loads into the reference-style modules
    last.load_state_dict({k.split(".", 1)[1]: v for k, v in head.state_dict().items() if k.startswith("last_layer")})


def test_weight_norm_gradients_match_torch_weight_norm():
    # float64: in fp32 a gradient entry that nearly cancels differs by rounding alone (seed-dependent failures)
    mlp, last = reference_style_head(4, 6, 5, 3)
    last.double()
    ours = WeightNormLinear(3, 6).double()
    ours.load_state_dict(last.state_dict())
    x = torch.randn(9, 3, dtype=torch.float64)
    target = torch.randn(9, 6, dtype=torch.float64)
    ((last(x) - target) ** 2).sum().backward()
    ((ours(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, last.weight_g.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.weight_v.grad, last.weight_v.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 1e-6), (torch.float32, 1e-12)])
def test_normalisation_eps_by_dtype(dtype, eps, monkeypatch):
    seen = []
    real = F.normalize

    def spy(x, p=2.0, dim=1, eps=1e-12, out=None):
        seen.append(eps)
        return real(x, p=p, dim=dim, eps=eps)

    monkeypatch.setattr(F, "normalize", spy)
    head = DINOHead(8, 10, hidden_dim=8, bottleneck_dim=4).to(dtype)
    out = head(torch.zeros(2, 8, dtype=dtype))
    assert seen == [eps] and torch.isfinite(out).all()
