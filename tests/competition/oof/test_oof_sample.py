"""Weight search on a stratified pixel sample (issue 21): the sample's weighted counts estimate the full
confusion matrix, the exact path (every pixel) reproduces the exhaustive per-image grid, and a sample picks
the same weights on a clear case."""

import numpy as np
import pytest

from competition.core.metrics import confusion
from competition.oof.nested import FoldTable
from competition.oof.sample import sample_oof, sample_pixels, vote_counts
from competition.oof.weights import _simplex, search_weights
from competition.predictions.oof import OofRuns
from competition.predictions.voting import combine
from tests.conftest import fake_oof_run, onehot


def test_stratified_sample_represents_every_class_and_weighs_pixels_back():
    target = np.zeros((32, 32), np.int64)
    target[:2, :3] = 2  # 6 pixels of a rare class
    target[10:30, 10:30] = 1
    target[0, 31] = 255  # ignored
    index, weight = sample_pixels(target, 3, 255, 60, np.random.default_rng(0))
    flat = target.ravel()
    assert len(index) == 6 + 20 + 20 and len(set(index.tolist())) == len(index)
    assert (flat[index] != 255).all()
    for c in range(3):
        assert weight[flat[index] == c].sum() == pytest.approx((flat == c).sum())  # each stands for its share
    small, ones = sample_pixels(target, 3, 255, 4096, np.random.default_rng(0))
    assert len(small) == 1023 and (ones == 1).all()  # few enough pixels: all of them


def _runs(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    runs = []
    targets = {f: {f"{f}{i}": rng.integers(0, 3, (12, 12)) for i in range(3)} for f in (0, 1, 2)}
    for r, (noise, confidence) in enumerate(((0.3, 0.7), (0.45, 0.6), (0.6, 0.8))):
        folds = {
            f: {k: (onehot(np.where(rng.random(t.shape) < noise, (t + 1) % 3, t), 3, confidence), t)
                for k, t in items.items()}
            for f, items in targets.items()
        }  # fmt: skip
        runs.append(fake_oof_run(tmp_path, f"r{r}", folds, ["bg", "a", "b"]))
    return runs


def test_exact_search_equals_the_exhaustive_per_image_grid(tmp_path):
    runs = _runs(tmp_path)
    oof = OofRuns(runs)
    grid = _simplex(3, 0.1)
    table = FoldTable(3, 255)
    for _, fold, probs, target in oof:  # the search as it was: every vector re-votes every image
        for i, w in enumerate(grid):
            table.add(fold, i, combine(probs, w), target)
    found = search_weights(runs, per_image=None)
    keys = list(range(len(grid)))
    np.testing.assert_allclose(found.weights, grid[table.best(keys)])
    for fold in (0, 1, 2):
        np.testing.assert_allclose(found.fold_weights[fold], grid[table.best(keys, without=fold)])
    assert found.in_sample == table.miou(table.best(keys))
    per_class = search_weights(runs, per_image=None, per_class=True)
    counts = vote_counts(sample_oof(oof, 10**9), per_class.weights[None])
    direct = sum(confusion(combine(p, per_class.weights), t, 3, 255) for _, _, p, t in oof)
    np.testing.assert_array_equal(sum(counts.values())[0], direct)  # per-class votes as combine makes them


def test_a_pixel_sample_picks_the_exhaustive_choice_on_a_clear_case(tmp_path):
    runs = _runs(tmp_path, seed=3)
    exact = search_weights(runs, per_image=None)
    sampled = search_weights(runs, per_image=48)  # a third of each 12x12 image
    np.testing.assert_allclose(sampled.weights, exact.weights)
    assert abs(sampled.in_sample - exact.in_sample) < 0.03


def _noisy_runs(root, runs=4, seed=0, size=24, classes=4):
    """Runs whose probabilities are a noisy softmax of the target, noisier for later runs: scores vary
    smoothly with the weights, so the search has a real optimum to find."""
    rng = np.random.default_rng(seed)
    targets = {f: {f"{f}_{i}": rng.integers(0, classes, (size, size)) for i in range(4)} for f in range(3)}
    out = []
    for r in range(runs):
        folds = {}
        for f, items in targets.items():
            folds[f] = {}
            for k, t in items.items():
                logits = rng.normal(0, 1.0 + 0.3 * r, (classes, size, size)) + 1.5 * (
                    np.arange(classes)[:, None, None] == t
                )
                e = np.exp(logits - logits.max(0))
                folds[f][k] = ((e / e.sum(0)).astype(np.float32), t)
        out.append(fake_oof_run(root, f"n{r}", folds, [f"c{c}" for c in range(classes)]))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_search_scores_a_few_vectors_and_does_as_well_as_the_grid(tmp_path, seed):
    runs = _noisy_runs(tmp_path, seed=seed)
    grid = search_weights(runs, per_image=None, method="grid")
    greedy = search_weights(runs, per_image=None, method="greedy")
    assert grid.method == "grid" and greedy.method == "greedy"
    assert len(grid.table) == len(_simplex(4, 0.1)) == 287  # 286 on the grid, and equal weights
    assert len(greedy.table) <= 1 + 10 * 4  # equal weights, then 10 picks of 4 runs at most
    assert greedy.in_sample >= grid.in_sample - 0.005
    # its scores are those of a plain soft vote with the chosen weights, counted on every pixel
    oof = OofRuns(runs)
    direct = FoldTable(4, 255)
    for _, fold, p, t in oof:
        direct.add(fold, "w", combine(p, greedy.weights), t)
    assert greedy.in_sample == pytest.approx(direct.miou("w"))
    assert search_weights(runs, per_image=None).method == "grid"  # auto: 287 vectors fit under the limit
    assert search_weights(runs, step=0.05, per_image=None).method == "greedy"  # 1771 do not


def test_an_unknown_search_method_is_refused(tmp_path):
    runs = _noisy_runs(tmp_path, runs=2)
    with pytest.raises(ValueError, match="unknown weight search 'random'"):
        search_weights(runs, method="random")


def test_oof_maps_are_shrunk_to_the_submission_size_by_default_never_enlarged(tmp_path):
    import torch

    from competition.core.config import TrainConfig
    from competition.predictions.oof import OofWriter

    assert TrainConfig().oof_size == 256  # the Boostcamp submission size; null keeps the native size
    with OofWriter(tmp_path / "oof.npz", "probs", 16, ["bg", "a"], 0, 255) as writer:
        for key, side in (("big", 32), ("small", 8)):
            probs = torch.rand(1, 2, side, side).softmax(1)
            mask = torch.ones(1, side, side, dtype=torch.long)
            writer.add({"image_id": [key], "file_name": [f"{key}.png"], "mask": mask}, probs)
    data = np.load(tmp_path / "oof.npz")
    assert data["pred__big"].shape == (2, 16, 16) and data["target__big"].shape == (16, 16)
    assert data["pred__small"].shape == (2, 8, 8) and data["target__small"].shape == (8, 8)


def test_evaluate_searches_weights_and_tunes_in_two_passes_over_the_oof_files(tmp_path, monkeypatch, capsys):
    from competition.cli import main
    from competition.oof.tune import tune

    runs = _noisy_runs(tmp_path, runs=2)
    found = search_weights(runs)
    expected = tune(runs, found.weights, found.fold_weights)
    reads = []
    original = OofRuns.read
    monkeypatch.setattr(OofRuns, "read", lambda self, key: reads.append(key) or original(self, key))
    pp = tmp_path / "pp.json"
    args = ["evaluate", "--runs", *map(str, runs), "--search-weights", "--tune-postprocess", str(pp)]
    assert main(args) == 0
    assert len(reads) == 2 * 12  # the weight search's sample, then the OOF table and the tuning together
    out = capsys.readouterr().out
    assert f"{expected.nested:.4f} nested -> {pp}" in out
    assert f"post-processed {expected.in_sample:.4f} in-sample" in out


@pytest.mark.parametrize("method", ["grid", "greedy"])
def test_per_class_weights_never_score_below_the_per_run_ones_they_start_from(tmp_path, method):
    """Columns chosen one class at a time can lower the joint score together (seed 0 lost 0.008 in-sample
    before): they are kept only when together they beat the per-run weights."""
    runs = _noisy_runs(tmp_path, runs=5, seed=0)
    per_run = search_weights(runs, per_image=None, method=method)
    per_class = search_weights(runs, per_image=None, method=method, per_class=True)
    assert per_class.in_sample >= per_run.in_sample


def test_whole_weights_score_levels_on_exact_integer_sums_as_level_vote_does():
    """The search's candidates on stored levels (weights on a small denominator, per run or per run and
    class) vote as ``level_vote`` votes with their whole weights, ties to the first class; the float path
    gives the same classes wherever one class leads."""
    from competition.oof.sample import _voted, _voted_levels, _whole_rows
    from competition.predictions.oof import from_levels
    from competition.predictions.voting import level_vote

    rng = np.random.default_rng(1)
    levels = (rng.integers(0, 5, (4, 3, 500)) * 50).astype(np.uint8)  # [C, R, P], coarse: ties
    per_run = np.array([[1, 1, 1], [0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [0, 0, 1]]) / 1.0
    per_class = (rng.integers(0, 3, (5, 3, 4)) + (np.arange(3) == 0)[:, None]) / 2  # run 0 in every class
    for weights in (per_run, per_class):
        k = _whole_rows(weights, 4)
        assert k is not None
        np.testing.assert_allclose(k / k.sum(1, keepdims=True), weights / weights.sum(1, keepdims=True))
        voted = _voted_levels(k, levels)
        floats = _voted(weights.astype(np.float32), from_levels(levels))
        ties = 0
        for g, row in enumerate(k):
            counts = np.broadcast_to(row[:, None], (3, 4)) if row.ndim == 1 else row
            expected = level_vote([levels[:, r] for r in range(3)], counts)
            np.testing.assert_array_equal(voted[g], expected)
            sums = np.einsum("rc,crp->cp", counts, levels.astype(np.int64))
            ranked = np.sort(sums, 0)
            leads = ranked[-1] > ranked[-2]
            ties += (~leads).sum()
            np.testing.assert_array_equal(voted[g][leads], floats[g][leads])
        assert ties > 50
    assert _whole_rows(np.array([[1.0, np.sqrt(2), 1.0]]), 4) is None  # no denominator: the float vote
    assert _whole_rows(np.array([[1.0, 999.0, 0.0]]), 80) is None  # keys beyond float32's whole numbers


def test_the_sample_is_fold_by_fold_with_every_image_s_agreeing_pixels_first(tmp_path):
    """Each image's pixels are drawn by its own seeded generator; the sample lists folds in order, and
    within a fold the pixels where every run's argmax agrees (image by image), then the others: what a
    stable sort of the images' pixels by (fold, disagreeing) gives."""
    import zlib

    runs = _noisy_runs(tmp_path, runs=3, seed=2)
    oof = OofRuns(runs)
    sample = sample_oof(oof, per_image=100, seed=5)
    probs, target, weight, fold = [], [], [], []
    for key, f, maps, t in oof:
        rng = np.random.default_rng([5, zlib.crc32(key.encode())])
        index, w = sample_pixels(t, 4, oof.ignore_index, 100, rng)
        probs.append(np.stack([s.reshape(4, -1)[:, index] for s in maps.stored], axis=1))  # [C, R, n]
        target.append(t.reshape(-1)[index])
        weight.append(w)
        fold.append(np.full(len(index), f))
    probs, target, weight, fold = (np.concatenate(a, axis=-1) for a in (probs, target, weight, fold))
    each = probs.argmax(0)  # [R, N]
    agree = (each == each[:1]).all(0)
    order = np.lexsort((~agree, fold))
    np.testing.assert_array_equal(sample.probs, probs[:, :, order])
    np.testing.assert_array_equal(sample.target, target[order])
    np.testing.assert_array_equal(sample.weight, weight[order])
    np.testing.assert_array_equal(sample.fold, fold[order])
    np.testing.assert_array_equal(sample.agree, agree[order])
    np.testing.assert_array_equal(sample.label, each[0][order])
    assert sample.probs.flags.c_contiguous  # class-major: a chunk's class rows are contiguous runs of pixels
    assert 0 < agree.sum() < len(agree)


def test_the_search_s_counts_on_stored_levels_are_those_of_evaluate_s_vote_on_tied_maps(tmp_path):
    """Every pixel of coarse maps (levels 0, 51, ..., 255: many exact ties between weighted sums) scored by
    ``vote_counts`` with whole weights gives the confusion counts of ``soft_vote`` on the stored levels, the
    vote ``evaluate`` makes: ties to the first class, not to rounding."""
    from competition.predictions.voting import soft_vote

    rng = np.random.default_rng(4)
    targets = {f: {f"{f}_{i}": rng.integers(0, 3, (10, 10)) for i in range(3)} for f in (0, 1)}
    runs = []
    for r in range(3):
        folds = {}
        for f, items in targets.items():
            probs = {k: rng.dirichlet(np.ones(3), t.shape).transpose(2, 0, 1) for k, t in items.items()}
            folds[f] = {k: ((np.round(p * 5) / 5).astype(np.float32), items[k]) for k, p in probs.items()}
        runs.append(fake_oof_run(tmp_path, f"c{r}", folds, ["a", "b", "c"]))
    oof = OofRuns(runs)
    weights = np.array([[1, 1, 1], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.375, 0.25, 0.375]])
    counts = vote_counts(sample_oof(oof, 10**9), weights)
    for g, w in enumerate(weights):
        direct = {f: np.zeros((3, 3), np.int64) for f in (0, 1)}
        for _, fold, maps, t in oof:
            direct[fold] += confusion(soft_vote(maps.stored, w), t, 3, 255)
        for f in (0, 1):
            np.testing.assert_array_equal(counts[f][g], direct[f], err_msg=str(w))
