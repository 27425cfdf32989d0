"""kNN against a brute-force float64 reference (reference_spec.md §6.2, §12): ties, k beyond the train set and
the per-class counts, chunking, multi-label, the reference voting quirk, few-shot subsets, 2-process sharding."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from celldino.eval.knn import (class_indices_mapping, few_shot_subsets, knn_leave_one_out, knn_scores, knn_search,
                               topk_merge)
from gloo_ranks import init_gloo


def brute_force(train, labels, test, nb_knn, T, num_classes, normalize=True, voting="per_k"):
    """float64: full similarity matrix, neighbours sorted by (similarity desc, index asc), softmax votes."""
    tr, te = train.double(), test.double()
    if normalize:
        tr = tr / tr.norm(dim=1, keepdim=True)
        te = te / te.norm(dim=1, keepdim=True)
    sims = (te @ tr.T).numpy()
    max_k = min(max(nb_knn), len(tr))
    order = np.stack([np.lexsort((np.arange(len(tr)), -row))[:max_k] for row in sims])
    top = np.take_along_axis(sims, order, 1)
    lab = labels[torch.from_numpy(order)]
    onehot = lab.double() if labels.dim() == 2 else torch.nn.functional.one_hot(lab, num_classes).double()
    out = {}
    for k in nb_knn:
        kk = min(k, max_k)
        s = torch.from_numpy(top) / T
        w = torch.softmax(s, 1)[:, :kk] if voting == "reference" else torch.softmax(s[:, :kk], 1)
        out[k] = (w.unsqueeze(-1) * onehot[:, :kk]).sum(1)
    return out, order, top


def _check(scores, ref, atol):
    assert set(scores) == set(ref)
    for k in ref:
        assert scores[k].dtype == torch.float32
        torch.testing.assert_close(scores[k].double(), ref[k], atol=atol, rtol=0)


@pytest.mark.parametrize("chunks", [dict(), dict(train_chunk=7, query_chunk=3), dict(train_chunk=1, query_chunk=1),
                                    dict(block_bytes=1 << 10)])
def test_random_features_match_float64(chunks):
    torch.manual_seed(0)
    train, test = torch.randn(150, 24), torch.randn(40, 24)
    labels = torch.randint(0, 5, (150,))
    ref, _, _ = brute_force(train, labels, test, [1, 10, 20], 0.07, 5)
    _check(knn_scores(train, labels, test, [1, 10, 20], 0.07, 5, **chunks), ref, atol=2e-5)


@pytest.mark.parametrize("chunks", [dict(), dict(train_chunk=5, query_chunk=4), dict(train_chunk=2, query_chunk=7)])
def test_exact_ties_break_on_the_lower_train_index(chunks):
    # integer features, raw dot products (normalize=False): every similarity is exact and ties are everywhere,
    # including duplicated train rows with different labels
    g = torch.Generator().manual_seed(1)
    train = torch.randint(-1, 2, (60, 4), generator=g).float()
    train[30:40] = train[0:10]
    labels = torch.randint(0, 4, (60,), generator=g)
    test = torch.randint(-1, 2, (25, 4), generator=g).float()
    sims, idx = knn_search(train, test, 12, normalize=False, **chunks)
    _, order, top = brute_force(train, labels, test, [12], 1.0, 4, normalize=False)
    assert torch.equal(idx, torch.from_numpy(order))
    assert torch.equal(sims.double(), torch.from_numpy(top))
    ref, _, _ = brute_force(train, labels, test, [3, 12], 2.0, 4, normalize=False)
    _check(knn_scores(train, labels, test, [3, 12], 2.0, 4, normalize=False, **chunks), ref, atol=1e-6)


def test_k_beyond_the_train_set_and_the_class_counts():
    torch.manual_seed(2)
    train = torch.randn(9, 8)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2, 2])  # class 0: 2 samples, class 1: 1
    test = torch.randn(6, 8)
    ref, _, _ = brute_force(train, labels, test, [5, 50], 0.07, 3)
    scores = knn_scores(train, labels, test, [5, 50], 0.07, 3)
    _check(scores, ref, atol=2e-5)
    full = knn_scores(train, labels, test, [9], 0.07, 3)[9]
    torch.testing.assert_close(scores[50], full)  # k = 50 > 9 train samples uses all 9
    torch.testing.assert_close(scores[50].sum(1), torch.ones(6))


def test_multilabel_vote_mass():
    torch.manual_seed(3)
    train, test = torch.randn(80, 16), torch.randn(20, 16)
    labels = (torch.rand(80, 6) < 0.3).long()
    ref, _, _ = brute_force(train, labels, test, [1, 7], 0.07, 6)
    scores = knn_scores(train, labels, test, [1, 7], 0.07)
    _check(scores, ref, atol=2e-5)
    assert scores[1].shape == (20, 6)


def test_reference_voting_quirk():
    torch.manual_seed(4)
    train, test = torch.randn(100, 16), torch.randn(30, 16)
    labels = torch.randint(0, 4, (100,))
    ref, _, _ = brute_force(train, labels, test, [1, 10, 20], 0.07, 4, voting="reference")
    quirk = knn_scores(train, labels, test, [1, 10, 20], 0.07, 4, voting="reference")
    _check(quirk, ref, atol=2e-5)
    fixed = knn_scores(train, labels, test, [1, 10, 20], 0.07, 4)
    assert (quirk[1].sum(1) < 0.999).any()  # k = 1 mass is the softmax over the top 20, not 1
    torch.testing.assert_close(fixed[1].sum(1), torch.ones(30))
    for k in (1, 10, 20):  # same argmax either way
        assert torch.equal(quirk[k].argmax(1), fixed[k].argmax(1))
    torch.testing.assert_close(quirk[20], fixed[20])


def test_bad_inputs():
    with pytest.raises(ValueError, match="dimension"):
        knn_scores(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), [1])
    with pytest.raises(ValueError, match="train labels"):
        knn_scores(torch.randn(5, 4), torch.zeros(4, dtype=torch.long), torch.randn(2, 4), [1])
    with pytest.raises(ValueError, match="NaN"):
        knn_scores(torch.full((5, 4), float("nan")), torch.zeros(5, dtype=torch.long), torch.randn(2, 4), [1])


def test_topk_merge_keeps_the_order_rule():
    va, ia = torch.tensor([[3.0, 1.0, 1.0]]), torch.tensor([[2, 0, 1]])
    vb, ib = torch.tensor([[3.0, 1.0, -math.inf]]), torch.tensor([[5, 4, -1]])
    v, i = topk_merge(va, ia, vb, ib, 4)
    assert i.tolist() == [[2, 5, 0, 1]] and v.tolist() == [[3.0, 3.0, 1.0, 1.0]]


def test_few_shot_subsets():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    tries = few_shot_subsets(labels, 4, n_tries=3)
    for subset in tries:
        counts = torch.bincount(labels[subset], minlength=3)
        assert counts.tolist() == [4, 3, 4]
    assert not all(torch.equal(tries[0], t) for t in tries[1:])  # different seeds, different subsets
    assert all(torch.equal(a, b) for a, b in zip(tries, few_shot_subsets(labels, 4, n_tries=3)))  # seeded
    half = few_shot_subsets(labels, 0.5)[0]
    assert torch.bincount(labels[half], minlength=3).tolist() == [5, 1, 3]
    multi = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]])
    assert {k: v.tolist() for k, v in class_indices_mapping(multi).items()} == {0: [0, 1], 1: [1, 2, 3]}


def test_leave_one_out_equals_manual_loop():
    from sklearn.metrics import f1_score
    torch.manual_seed(5)
    train, train_y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    test, test_y = torch.randn(18, 8), torch.randint(4, 7, (18,))
    groups = np.array(["a", "b", "c"] * 6)
    got = knn_leave_one_out(train, train_y, test, test_y, groups, [1, 5], 0.07, num_classes=7, score_labels=[4, 5, 6])
    preds = {1: np.zeros(18, int), 5: np.zeros(18, int)}
    for g in "abc":
        held = groups == g
        tr = torch.cat([train, test[torch.from_numpy(~held)]])
        ty = torch.cat([train_y, test_y[torch.from_numpy(~held)]])
        ref, _, _ = brute_force(tr, ty, test[torch.from_numpy(held)], [1, 5], 0.07, 7)
        for k in (1, 5):
            preds[k][held] = ref[k].argmax(1).numpy()
    order = np.concatenate([np.nonzero(groups == g)[0] for g in "abc"])
    for k in (1, 5):
        expected = f1_score(test_y.numpy()[order], preds[k][order], average="macro", labels=[4, 5, 6],
                            zero_division=0)
        assert got[k] == pytest.approx(expected)


# ---- 2 gloo processes: sharded search == one process ----------------------------------------------------------

def _worker(rank, world, store_file, train, labels, test, queue):
    init_gloo(rank, world, store_file)
    try:
        # uneven queries per rank (7 and 12), full train on every rank (each uses its tensor_split piece)
        my_test = test[:7] if rank == 0 else test[7:]
        full = knn_scores(train, labels, my_test, [1, 5, 40], 0.07, 4, train_chunk=6)
        # the same with each rank holding only its own piece of the train set
        piece = torch.tensor_split(torch.arange(len(train)), world)[rank]
        sharded = knn_scores(train[piece], labels[piece], my_test, [1, 5, 40], 0.07, 4, train_is_sharded=True)
        _, idx = knn_search(train, my_test, 9)
        # numpy travels by value (a tensor would be shared memory that dies with this process)
        queue.put((rank, {k: v.numpy() for k, v in full.items()}, {k: v.numpy() for k, v in sharded.items()},
                   idx.numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_sharded_knn_equals_single_process(tmp_path):
    g = torch.Generator().manual_seed(6)
    train = torch.randn(31, 12, generator=g)
    train[20:25] = train[0:5]  # exact duplicates across the two shards: ties must still go to the lower index
    labels = torch.randint(0, 4, (31,), generator=g)
    test = torch.randn(19, 12, generator=g)
    test[3] = train[2]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = str(tmp_path / "gloo_store")
    procs = [ctx.Process(target=_worker, args=(r, 2, store, train, labels, test, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((item[0], item[1:]) for item in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    single = knn_scores(train, labels, test, [1, 5, 40], 0.07, 4)
    _, single_idx = knn_search(train, test, 9)
    for rank, rows in ((0, slice(0, 7)), (1, slice(7, 19))):
        full, sharded, idx = results[rank]
        assert torch.equal(torch.from_numpy(idx), single_idx[rows])
        for k in (1, 5, 40):
            torch.testing.assert_close(torch.from_numpy(full[k]), single[k][rows])
            torch.testing.assert_close(torch.from_numpy(sharded[k]), single[k][rows])


def test_evaluate_knn_on_an_in_memory_model():
    from eval_helpers import TensorItems, tiny_vit
    from celldino.eval.knn import evaluate_knn

    model = tiny_vit(in_chans=2, seed=0)

    def items(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = [i % 3 for i in range(n)]
        # the class sets a strong per-channel offset: easy for any features
        imgs = [torch.randn(2, 32, 32, generator=g) + 4.0 * torch.tensor([lab, 2 - lab])[:, None, None]
                for lab in labels]
        return TensorItems(imgs, labels)

    out = evaluate_knn(model, items(30, 1), items(12, 2), test_dataset=items(9, 3), nb_knn=[1, 5],
                       n_per_class_list=[-1, 2], n_tries=3, dataset_names={"val": "V", "test": "T"}, progress=False,
                       batch_size=8)
    assert out["metric"] == "mean_per_class_multiclass_f1" and out["n_train"] == 30
    r = out["results"]
    assert {"V_1 Top 1", "V_5 Top 1", "T_1 Top 1", "V_1_n2 Top 1", "V_1_n2 Top 1 std", "T_5_n2 Top 1"} <= set(r)
    assert r["V_5 Top 1"] == 100.0 and r["T_5 Top 1"] == 100.0
    assert len(out["report"]["val"]) == 3 and out["report"]["val"][0]["support"] == 4
    one_class = TensorItems([torch.randn(2, 32, 32) for _ in range(6)], [0] * 6)  # scored 100 before: refused
    with pytest.raises(ValueError, match="the train split has a single class .label 0 for all 6 images"):
        evaluate_knn(model, one_class, items(12, 2), nb_knn=[1], progress=False)


def test_evaluate_knn_leave_one_out_and_the_metric_from_the_labels(tmp_path):
    """What eval knn's CLI did itself before it became a thin wrapper: the CHAMMI leave-one-out protocol on the
    train + val features, the metric chosen from the train labels (metric=None), and the JSON lines file."""
    from eval_helpers import TensorItems, tiny_vit
    from celldino.eval.features import extract_features
    from celldino.eval.knn import evaluate_knn

    model = tiny_vit(in_chans=2, seed=0)

    def items(n, seed, multi_hot=False):
        g = torch.Generator().manual_seed(seed)
        labels = [i % 7 for i in range(n)]
        imgs = [torch.randn(2, 32, 32, generator=g) + torch.tensor([lab, 6 - lab])[:, None, None] for lab in labels]
        if multi_hot:
            labels = [np.array([lab % 2, lab % 3 == 0, lab >= 4], dtype=np.int64) for lab in labels]
        return TensorItems(imgs, labels)

    train, val = items(28, 1), items(14, 2)
    groups = ["AB"[i % 2] for i in range(14)]
    meta = tmp_path / "enriched_meta_CP.csv"
    meta.write_text("Plate,Task_four\n" + "".join(f"{g},True\n" for g in groups))
    out = evaluate_knn(model, train, val, nb_knn=[1, 5], leave_one_out_dataset=str(meta), batch_size=8,
                       dataset_names={"val": "V"}, output_dir=str(tmp_path / "out"), progress=False)
    f = {s: extract_features(model, ds, kind="knn", batch_size=8, progress=False) for s, ds in (("train", train),
                                                                                                 ("val", val))}
    expected = knn_leave_one_out(f["train"].features, f["train"].labels, f["val"].features, f["val"].labels, groups,
                                 [1, 5], 0.07, score_labels=[4, 5, 6], normalize=False)
    assert out["results"] == {f"V_{k} Top 1": 100 * v for k, v in expected.items()} and expected[5] > 0
    assert out["metric"] == "leave-one-out macro F1 over labels 4, 5, 6" and not out["report"]
    lines = (tmp_path / "out" / "results_eval_knn.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{k: v} for k, v in out["results"].items()]

    multi = evaluate_knn(model, items(28, 1, True), items(14, 2, True), metric=None, nb_knn=[5], batch_size=8,
                         progress=False)
    assert multi["metric"] == "mean_per_class_multilabel_f1"
    with pytest.raises(ValueError, match="does not fit multi-hot labels"):  # the API default stays multiclass F1
        evaluate_knn(model, items(28, 1, True), items(14, 2, True), nb_knn=[5], batch_size=8, progress=False)
    assert evaluate_knn(model, train, val, metric=None, nb_knn=[5], batch_size=8,
                        progress=False)["metric"] == "mean_per_class_multiclass_f1"


def test_splits_built_alone_share_the_train_label_space(tmp_path):
    """Folder / CSV splits number their class names on their own; a val split missing class b (and a test split
    holding a class train never saw) must still be scored against train's indices. Val images are copies of train
    images, so 1-NN is right on every one of them."""
    from PIL import Image

    from eval_helpers import tiny_vit
    from celldino.eval.knn import evaluate_knn
    from celldino.eval.inputs import make_eval_dataset, share_label_space

    rng = np.random.default_rng(0)
    images = {c: [(rng.random((16, 16)) * 255).astype(np.uint8) for _ in range(3)] for c in "abcd"}
    for split, classes in (("train", "abc"), ("val", "ac"), ("test", "cd")):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            for j, im in enumerate(images[c]):
                Image.fromarray(im).save(tmp_path / split / c / f"{j}.png")
    spec = {s: f"Folder:root={tmp_path / s}" for s in ("train", "val", "test")}

    built = {s: make_eval_dataset(v, crop_size=16) for s, v in spec.items()}
    assert built["val"].get_targets().tolist() == [0, 0, 0, 1, 1, 1]  # numbered alone: c is 1
    names = share_label_space(built["train"], built["val"], built["test"])
    assert names == ["a", "b", "c", "d"]
    assert built["val"].get_targets().tolist() == [0, 0, 0, 2, 2, 2]
    assert built["test"].get_targets().tolist() == [2, 2, 2, 3, 3, 3] and built["test"].classes == names
    assert built["train"].get_targets().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    out = evaluate_knn(tiny_vit(in_chans=1, seed=0), spec["train"], spec["val"], test_dataset=spec["test"],
                       nb_knn=(1,), crop_size=16, progress=False)
    rows = {r["class"]: r for r in out["report"]["val"]}
    assert rows["a"]["f1"] == 1.0 and rows["c"]["f1"] == 1.0 and rows["b"]["support"] == 0
    assert rows["a"]["support"] == 3 and rows["c"]["predicted"] == 3
    test_rows = {r["class"]: r for r in out["report"]["test"]}
    # d's items vote for train classes (one of them for c here): c keeps its recall, d is never predicted
    assert test_rows["c"]["recall"] == 1.0 and test_rows["d"]["support"] == 3 and test_rows["d"]["predicted"] == 0


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_a_bad_leave_one_out_file_fails_before_any_feature_is_extracted(tmp_path, monkeypatch, protocol):
    """The CHAMMI metadata is read first: a missing file or column fails at once, not after the extraction."""
    from eval_helpers import TensorItems, tiny_vit
    from celldino.eval import features, knn, linear

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before the leave-one-out metadata was read")
    monkeypatch.setattr(features, "extract_features", no_extraction)
    model = tiny_vit(in_chans=2, seed=0)
    data = TensorItems([torch.randn(2, 32, 32) for _ in range(6)], [i % 3 for i in range(6)])
    evaluate = {"knn": lambda **kw: knn.evaluate_knn(model, data, data, nb_knn=[1], **kw),
                "linear": lambda **kw: linear.evaluate_linear(model, data, data, mode="features", **kw)}[protocol]
    with pytest.raises(FileNotFoundError, match="leave-one-out metadata .*missing.csv does not exist"):
        evaluate(leave_one_out_dataset=str(tmp_path / "missing.csv"), progress=False)
    meta = tmp_path / "enriched_meta_CP.csv"
    meta.write_text("Plate,Task\nA,True\n")
    with pytest.raises(ValueError, match="no 'Task_four' column"):
        evaluate(leave_one_out_dataset=str(meta), progress=False)
