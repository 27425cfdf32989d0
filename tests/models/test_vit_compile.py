"""torch.compile(fullgraph=True) per block (how the trainer compiles the model): the single-tensor, packed eval
and packed train (sample-subset stochastic depth) paths trace without graph breaks, with identical results, under
aot_eager (every path) and inductor (the trainer's default backend; CPU C++ code generation takes ~1 min cold)."""
import pytest
import torch

from celldino.models import vit_small


def compile_blocks(model, backend):
    for block in model.iter_blocks():
        block.compile(backend=backend, fullgraph=True, dynamic=False)
    return model


def make_pair(backend, **overrides):
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = dict(patch_size=16, img_size=64, in_chans=2, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                  block_chunks=2, num_register_tokens=1, drop_path_rate=0.2, drop_path_uniform=True)
    kwargs.update(overrides)
    eager = vit_small(**kwargs)
    compiled = compile_blocks(vit_small(**kwargs), backend)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def assert_train_step_has_finite_grads(model, xs, masks):
    outs = model.forward_features_list(xs, masks)  # subset stochastic depth inside the compiled blocks
    sum(o["x_norm_clstoken"].sum() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_blocks_compile_fullgraph_and_match_eager():
    eager, compiled = make_pair("aot_eager")
    xs = [torch.randn(4, 2, 64, 64), torch.randn(6, 2, 32, 32)]
    masks = [torch.rand(4, 16) < 0.3, None]

    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(xs[0]), eager(xs[0]), rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled.forward_features_list(xs, masks), eager.forward_features_list(xs, masks)):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=1e-5, atol=1e-5)

    compiled.train()
    assert_train_step_has_finite_grads(compiled, xs, masks)


@pytest.mark.slow
def test_packed_train_block_compiles_with_inductor_on_cpu():
    """The trainer's `compile: true` on a CPU: inductor, fullgraph, packed multi-crop forward and backward (the
    attention gets its offsets as ints under compile, see layers/attention.py)."""
    eager, compiled = make_pair("inductor", depth=1, block_chunks=0, drop_path_rate=0.0)
    xs = [torch.randn(4, 2, 64, 64), torch.randn(6, 2, 32, 32)]
    masks = [torch.rand(4, 16) < 0.3, None]
    eager.train(), compiled.train()
    for a, b in zip(compiled.forward_features_list(xs, masks), eager.forward_features_list(xs, masks)):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=1e-5, atol=1e-5)
    assert_train_step_has_finite_grads(compiled, xs, masks)
