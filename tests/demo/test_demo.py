"""`celldino demo` end to end on the bundled sample (the README's first command), with a tiny model so it fits CI:
pretraining writes a teacher export, kNN F1 is reported for raw pixels / random init / trained, the val crops are
embedded into AnnData with a UMAP PNG, and demo_results.json ties them together. A second run resumes."""
import json
import math

import pytest

from celldino import cli

TINY = ["student.embed_dim=48", "student.depth=2", "student.num_heads=2", "train.batch_size_per_gpu=8",
        "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=1", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
        "optim.freeze_last_layer_epochs=0", "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64",
        "dino.head_hidden_dim=64", "ibot.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
        "ibot.head_bottleneck_dim=32", "train.num_workers=0", "evaluation.eval_period_iterations=3"]


@pytest.mark.slow
def test_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--device", "cpu"] + TINY) == 0
    printed = capsys.readouterr().out
    assert "[1/3]" in printed and "[2/3]" in printed and "[3/3]" in printed and "random init" in printed

    summary = json.loads((out / "demo_results.json").read_text())
    scores = summary["knn_mean_per_class_f1"]
    assert set(scores) == {"raw pixels (no model)", "random init", "trained (training_2)"}
    for row in scores.values():
        assert set(row) == {"10", "20"} or set(row) == {10, 20}
        assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in row.values())
    assert (out / "eval" / "training_2" / "teacher_checkpoint.pth").is_file()
    assert (out / "config.yaml").is_file() and (out / "training_metrics.json").is_file()

    import anndata
    adata = anndata.read_h5ad(summary["anndata"])
    assert adata.n_obs > 0 and adata.X.shape[1] == 48 and "stain" in adata.obs and "X_umap" in adata.obsm
    png = out / "stain_task_val_umap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # running the same command again resumes the finished run instead of training from scratch
    assert cli.main(["demo", "--output-dir", str(out), "--device", "cpu"] + TINY) == 0
    assert json.loads((out / "demo_results.json").read_text())["knn_mean_per_class_f1"] == scores


def test_demo_reports_bad_input_in_one_line(tmp_path, capsys):
    """A --data-dir without the sample, a bad override, and a sample CSV naming missing files: exit 2 with one
    line saying what is wrong (no traceback), as `celldino train` does."""
    assert cli.main(["demo", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "a")]) == 2
    assert f"--data-dir {tmp_path} has no stain_task/stain_task.csv" in capsys.readouterr().err
    sample = tmp_path / "stain_task"
    sample.mkdir()
    (sample / "stain_task.csv").write_text("path,label,split\nnot_there.tif,a,train\n")
    assert cli.main(["demo", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "b"), "train.nope=1"]) == 2
    assert "celldino demo: " in capsys.readouterr().err
    assert cli.main(["demo", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "c"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "celldino demo: train.dataset_path" in err and "not_there.tif" in err and "Traceback" not in err
