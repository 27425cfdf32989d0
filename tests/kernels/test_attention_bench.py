"""The attention benchmark runs end to end on the CPU (tiny layout; the Triton provider under the interpreter)."""
import argparse

from celldino.benchmarks import bench_attention


def test_bench_attention_quick_rows():
    args = argparse.Namespace(quick=True, attn_providers=["sdpa_per_group", "celldino", "padded_sdpa"])
    rows = bench_attention.run(args)
    providers = {r["provider"] for r in rows}
    assert providers == {"sdpa_per_group", "celldino", "padded_sdpa"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["median_ms"] > 0 and r["tflops"] != ""
        assert r["speedup_vs_baseline"] != "" and r["baseline"] == "sdpa_per_group"
        # every provider computed the same attention as the baseline
        diff = float(r["note"].split("|")[-1].split()[0].rstrip(";"))
        assert diff < 1e-5, r["note"]


def test_layout_helpers():
    lengths = bench_attention.crop_lengths(2, 8, 197, 37, 3)
    assert sum(lengths) == 3 * 690 and lengths[:6] == [197] * 6 and lengths[6:] == [37] * 24
    assert bench_attention._groups(lengths) == [(0, 6, 197), (6 * 197, 24, 37)]
    assert bench_attention.attention_flops([2, 3], 2, 4) == 4 * (4 + 9) * 2 * 4
