"""Leaderboard toolkit, inference side: post-processing, voting, per-class weights, audit, exclude lists."""

import json

import numpy as np
import pandas as pd
import pytest

from competition.cli import main
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.core.metrics import argmax_classes, confusion
from competition.data.splits import build_datasets
from competition.oof.scores import audit_table
from competition.oof.tune import AREAS, Vote, _outcomes, tune
from competition.oof.weights import search_weights
from competition.predictions import voting
from competition.predictions.postprocess import PostProcess, enclosed, fill_holes, remove_small
from competition.predictions.voting import class_weights, combine, level_vote, soft_scores, whole_weights
from tests.conftest import fake_oof_run, onehot, tiny_config_dict


def test_min_area_removes_exactly_the_components_below_the_threshold():
    mask = np.zeros((10, 12), np.uint8)
    mask[0, 0:3] = 1  # 3 px
    mask[3:4, 0:5] = 1  # 5 px
    mask[6:8, 0:5] = 1  # 10 px
    mask[0:2, 8:10] = 2  # 4 px of another class
    mask[9, 11] = 1  # 1 px, touching nothing
    mask[8, 10] = 1  # diagonal neighbour of it: one 8-connected component of 2 px
    out = remove_small(mask, 1, 5)
    assert (out[0, 0:3] == 0).all() and (out[9, 11] == 0) and (out[8, 10] == 0)
    assert (out[3, 0:5] == 1).all() and (out[6:8, 0:5] == 1).all()  # 5 px is not below 5
    assert (out[0:2, 8:10] == 2).all()
    assert out.sum() == mask.sum() - 3 - 2  # nothing else changed
    assert remove_small(mask, 1, 0) is mask


def test_fill_holes_fills_enclosed_background_only():
    mask = np.zeros((9, 9), np.uint8)
    mask[1:8, 1:8] = 2
    mask[3:6, 3:6] = 0  # a hole
    mask[4, 4] = 1  # another class inside it stays
    mask[0:3, 7:9] = 0  # open to the border: not a hole
    out = fill_holes(mask, 2)
    assert out[4, 4] == 1 and out[3, 3] == 2 and (out[3:6, 3:6] != 0).all()
    assert (out[0, 7:9] == 0).all() and (out == 0).sum() == (mask == 0).sum() - 8


def test_enclosed_pixels_are_what_scipy_fill_holes_adds():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        region = ndimage.binary_opening(
            rng.random((40, 50)) < density
        )  # blobs with holes, some at the border
        expected = ndimage.binary_fill_holes(region) & ~region
        np.testing.assert_array_equal(enclosed(region), expected)
        assert expected.any() or density < 0.5
    for _ in range(200):  # any shape down to one pixel, any density: the flood from the frame agrees
        region = rng.random(rng.integers(1, 24, 2)) < rng.random()
        np.testing.assert_array_equal(enclosed(region), ndimage.binary_fill_holes(region) & ~region)


def test_each_tuning_candidate_counts_what_applying_it_gives():
    """The tuner corrects the plain confusion counts on the changed pixels; applying the setting with
    ``PostProcess`` and counting afresh must give the same matrix, for every setting and class."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    names = ["bg", "a", "b"]
    for _ in range(3):
        pred = (ndimage.binary_opening(rng.random((64, 64)) < 0.6) * rng.integers(1, 3, (64, 64))).astype(
            np.uint8
        )
        pred[rng.random(pred.shape) < 0.01] = 1  # specks of 1 px
        target = np.where(rng.random(pred.shape) < 0.8, pred, rng.integers(0, 3, pred.shape))
        target[0, :5] = 255
        plain = confusion(pred, target, 3, 255)
        for cls in (1, 2):
            outcomes = _outcomes(pred, target, cls, plain, 255)
            for area in AREAS:
                for holes in (False, True):
                    pp = PostProcess(names, min_area={names[cls]: area}, fill_holes={names[cls]: holes})
                    expected = confusion(pp(pred), target, 3, 255)
                    np.testing.assert_array_equal(
                        outcomes[(area, holes)], expected, err_msg=f"{cls} {area} {holes}"
                    )
        assert any(not np.array_equal(m, plain) for m in outcomes.values())
    assert _outcomes(np.zeros((8, 8), np.uint8), np.zeros((8, 8)), 1, plain, 255) == {}  # class absent
    pred = np.zeros((32, 32), np.uint8)  # class 1 without a hole: blocks and specks (some on the border)
    pred[3:12, 3:12], pred[20:30, 0:9], pred[15, 15], pred[0, 20], pred[31, 31] = 1, 1, 1, 1, 1
    pred[2:6, 20:24] = 2
    outcomes, plain = _every_setting_of_class_1(pred, rng)
    assert not np.array_equal(outcomes[(AREAS[-1], True)], plain)  # the specks removed
    pred = np.zeros((48, 48), np.uint8)  # a ring of class 1 around class 2 and a speck of class 1, no
    pred[4:30, 4:30], pred[8:26, 8:26], pred[16, 16] = 1, 2, 1  # background inside: filling puts the speck
    pred[rng.random(pred.shape) < 0.02] = 1  # back once it is removed; diagonal specks: 4-pieces
    outcomes, _ = _every_setting_of_class_1(pred, rng)
    assert not np.array_equal(outcomes[(AREAS[-1], True)], outcomes[(AREAS[-1], False)])


def test_final_scoring_applies_settings_from_what_the_candidates_recorded():
    """The tuner scores its choices without labelling or flooding again: each pixel's removal order and each
    class's enclosed pixels per setting (recorded while counting the candidates) give any combination of
    per-class settings. The same maps as ``PostProcess`` for every combination of two classes' settings, on
    maps where the classes touch, enclose each other and speckle."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    names = ["bg", "a", "b"]
    for _ in range(3):
        pred = (ndimage.binary_opening(rng.random((64, 64)) < 0.6) * rng.integers(1, 3, (64, 64))).astype(
            np.uint8
        )
        pred[rng.random(pred.shape) < 0.03] = rng.integers(1, 3)  # specks, some inside the other class
        pred[20:40, 20:40], pred[25:35, 25:35], pred[30, 30] = 1, 2, 0  # b inside a, a hole inside b
        target = rng.integers(0, 3, pred.shape)
        vote = Vote(pred, confusion(pred, target, 3, 255))
        for cls in (1, 2):
            _outcomes(pred, target, cls, vote.plain, 255, vote=vote)
        assert vote.order.max() == 3 and not vote.order[pred == 0].any()  # 4096 px: 1e-4, 3e-4 under 2 px
        vote.close()  # only the enclosed pixels a fill can change are kept
        kept = [i for per_setting in vote.inside.values() for i in per_setting]
        assert all(((pred.flat[i] == 0) | (vote.order.flat[i] > 0)).all() for i in kept)
        assert sum(len(i[0]) for i in vote.inside.values()) < sum(enclosed(pred == c).sum() for c in (1, 2))
        for area_a in AREAS:
            for area_b in AREAS:
                for fill in ({}, {"a": True}, {"b": True}, {"a": True, "b": True}):
                    pp = PostProcess(names, min_area={"a": area_a, "b": area_b}, fill_holes=fill)
                    made = vote.postprocessed(pp)
                    np.testing.assert_array_equal(made, pp(pred), err_msg=f"{area_a} {area_b} {fill}")
    pp = PostProcess(names, min_area={"a": 0.002}, fill_holes={"b": True})  # not a tuned setting: applied
    np.testing.assert_array_equal(vote.postprocessed(pp), pp(pred))


def test_soft_vote_of_stored_levels_with_whole_weights_is_the_exact_integer_vote():
    """uint8 levels whose weights are whole multiples of some 1 / m (equal weights, a search's grid, per
    class too) vote on their integer sums ``k * levels``, ties to the first class: the float vote's classes
    wherever one class leads, and never a class that does not lead (the float sums break ties by rounding).
    Weights on no such denominator keep the float vote; many members get wider keys."""
    rng = np.random.default_rng(0)
    levels = [(rng.integers(0, 4, (5, 7, 9)) * 60).astype(np.uint8) for _ in range(3)]  # few levels: ties
    raw = rng.integers(1, 4, (3, 5))  # per class: each column scaled to sum 1, so k = lcm * raw / column sum
    lcm = np.lcm.reduce(raw.sum(0))
    cases = [(None, np.ones((3, 5))), ([2, 2, 2], np.ones((3, 5))), (np.full((3, 5), 0.3), np.ones((3, 5)))]
    cases += [([0.5, 0.3, 0.2], np.repeat([[5], [3], [2]], 5, 1)), (raw, lcm * raw // raw.sum(0))]
    ties = 0
    for weights, k in cases:
        sums = sum(m.astype(np.int64) * k[r][:, None, None] for r, m in enumerate(levels))
        ranked = np.sort(sums, axis=0)
        leads = ranked[-1] > ranked[-2]
        ties += (~leads).sum()
        voted = combine(levels, weights)
        assert np.array_equal(voted, sums.argmax(0)), weights  # NumPy's first largest
        assert np.array_equal(voted[leads], argmax_classes(soft_scores(levels, weights))[leads])
    assert ties > 25  # ties to break
    w = [1.0, np.sqrt(2), np.pi]  # on no denominator: the float vote
    assert np.array_equal(combine(levels, w), argmax_classes(soft_scores(levels, w)))
    many = [rng.integers(0, 256, (3, 4, 4)).astype(np.uint8) for _ in range(300)]  # sums need 17 bits
    assert np.array_equal(level_vote(many), sum(m.astype(np.int64) for m in many).argmax(0))
    assert np.array_equal(level_vote(levels[:1]), levels[0].argmax(0))
    heavy = np.array([[900, 1, 1, 1, 1], [100, 999, 999, 999, 999]])  # keys beyond 16 bits
    weighted = sum(m.astype(np.int64) * k[:, None, None] for m, k in zip(levels[:2], heavy))
    assert np.array_equal(level_vote(levels[:2], heavy), weighted.argmax(0))


def test_whole_weights_are_the_smallest_whole_multiple_or_none():
    assert whole_weights([0.375, 0.25, 0.125, 0.125, 0.125]).tolist() == [3, 2, 1, 1, 1]
    assert whole_weights(np.full(5, 0.2)).tolist() == [1] * 5
    assert whole_weights(np.round([1 / 3, 2 / 3], 12)).tolist() == [1, 2]  # a table key's rounding
    assert whole_weights([[0.5, 0.25], [0.5, 0.75]]).tolist() == [[2, 1], [2, 3]]
    assert whole_weights([0.0, 0.0]).tolist() == [0, 0]
    assert whole_weights([1.0, np.sqrt(2)]) is None
    assert whole_weights([-0.5, 1.5]) is None
    assert whole_weights([0.5, 0.5], limit=1) is None
    assert whole_weights([0.001, 0.999]).tolist() == [1, 999]


def _every_setting_of_class_1(pred, rng):
    """The tuner's counts for class 1 of ``pred`` (target: ``pred`` with 20% noise), each checked against
    applying the setting with ``PostProcess``; returns them and the plain counts."""
    target = np.where(rng.random(pred.shape) < 0.8, pred, rng.integers(0, 3, pred.shape))
    plain = confusion(pred, target, 3, 255)
    outcomes = _outcomes(pred, target, 1, plain, 255)
    for area in AREAS:
        for holes in (False, True):
            pp = PostProcess(["bg", "a", "b"], min_area={"a": area}, fill_holes={"a": holes})
            np.testing.assert_array_equal(outcomes[(area, holes)], confusion(pp(pred), target, 3, 255))
    return outcomes, plain


def test_postprocess_operations_ignore_settings_that_do_nothing():
    """Two files whose mask operations are equal change every mask alike (the tuner then scores one)."""
    names = ["bg", "a", "b"]
    noisy = PostProcess(names, min_area={"a": 0.0, "b": 0.01}, fill_holes={"a": False, "b": True})
    plain = PostProcess(names, min_area={"b": 0.01}, fill_holes={"b": True}, scores={"x": 1.0})
    assert noisy.operations == plain.operations == ({"b": 0.01}, {"b"})
    assert noisy.operations != PostProcess(names, min_area={"b": 0.01}).operations
    assert not PostProcess(names, min_area={"a": 0.0}, fill_holes={"b": False}).changes_masks
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 2:9], mask[4, 4], mask[11, 11] = 2, 0, 2
    assert np.array_equal(noisy(mask), plain(mask)) and not np.array_equal(plain(mask), mask)


def test_postprocess_settings_are_fractions_of_the_image_and_belong_to_their_classes(tmp_path):
    pp = PostProcess(["bg", "a", "b"], min_area={"a": 0.05})  # 5% of 10x10 = 5 px
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0:4] = 1
    mask[5, 0:6] = 1
    assert pp(mask)[0, 0:4].sum() == 0 and pp(mask)[5].sum() == 6
    path = pp.save(tmp_path / "pp.json")
    assert PostProcess.load(path, ["bg", "a", "b"]).min_area == {"a": 0.05}
    with pytest.raises(ValueError, match=r"tuned for classes \['bg', 'a', 'b'\]"):
        PostProcess.load(path, ["bg", "b", "a"])
    with pytest.raises(ValueError, match="not in"):
        PostProcess(["bg", "a"], fill_holes={"c": True})
    with pytest.raises(ValueError, match="fraction"):
        PostProcess(["bg", "a"], min_area={"a": 5})


def test_hard_vote_majority_and_tie_break_by_summed_probability():
    a = np.array([0.1, 0.6, 0.3])[:, None, None]
    b = np.array([0.1, 0.2, 0.7])[:, None, None]
    c = np.array([0.2, 0.5, 0.3])[:, None, None]
    assert combine([a, b], vote="hard").item() == 2  # 1 vote each; summed 0.8 vs 1.0
    assert combine([a, b, c], vote="hard").item() == 1  # 2 votes beat b's confidence
    assert combine([a, b], weights=[3, 1], vote="hard").item() == 1  # a weighted vote
    assert combine([a, b, c]).item() == 1  # soft: mean (0.43, 0.43) -> tie goes to the first: 1


def _hard_vote_per_class(probs, weights):
    """The hard vote as its definition reads: every class's weighted votes, the classes within np.isclose
    of the most voted, the largest summed probability among them (the first class on a tie)."""
    w = class_weights(weights, len(probs), probs[0].shape[0])
    votes = sum(w[r][:, None, None] * (p.argmax(0) == np.arange(len(w[r]))[:, None, None]) for r, p in
                enumerate(probs))  # fmt: skip
    soft = soft_scores(probs, weights)
    return np.where(np.isclose(votes, votes.max(0)), soft, -1.0).argmax(0)


@pytest.mark.parametrize("table", [True, False], ids=["vote table", "voted per pixel"])
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 1.0, 0.0], [3.0, 1.0, 1.0, 1.0], "per_class"])
def test_hard_vote_counts_as_its_per_class_definition_on_tied_maps(weights, table, monkeypatch):
    """Quantised probabilities and equal weights make many exact ties between classes and between summed
    probabilities: the vote looked up in the table of label combinations (the tied pixels voted alone), and
    the vote counted on every pixel (beyond ``TABLE_LIMIT``), decide all of them as the per-class definition
    does."""
    assert 5**4 <= voting.TABLE_LIMIT
    if not table:
        monkeypatch.setattr(voting, "TABLE_LIMIT", 5**4 - 1)
    rng = np.random.default_rng(3)
    for _ in range(20):
        probs = [np.round(rng.dirichlet(np.ones(5), size=(9, 7)).transpose(2, 0, 1) * 4) / 4 for _ in "abcd"]
        w = weights
        if weights == "per_class":  # small integers: ties between summed votes; member 0 keeps every class
            w = rng.integers(0, 3, (4, 5)).astype(float)
            w[0] += 1
        assert np.array_equal(combine(probs, w, vote="hard"), _hard_vote_per_class(probs, w))


def test_per_class_weights_equal_to_per_run_ones_give_the_same_map():
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(4), size=(6, 5)).transpose(2, 0, 1) for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    per_class = np.repeat(w[:, None], 4, axis=1) * 7  # columns are normalised
    assert np.array_equal(combine(probs, w), combine(probs, per_class))
    with pytest.raises(ValueError, match="3 weights for 2"):
        class_weights([1, 2, 3], 2, 4)
    with pytest.raises(ValueError, match=">= 0"):
        class_weights([1, -1], 2, 4)
    with pytest.raises(ValueError, match="shape"):
        class_weights(np.ones((2, 3)), 2, 4)


def speckled_folds(seed, folds=(0, 1, 2), images=3):
    """OOF maps with a square object (class 1 or 2) and 1-px false specks of class 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in folds:
        out[f] = {}
        for i in range(images):
            target = np.zeros((24, 24), np.int64)
            cls = 1 + (i + f) % 2
            target[4:14, 5:15] = cls
            pred = target.copy()
            ys, xs = rng.integers(0, 24, 6), rng.integers(0, 24, 6)
            pred[ys, xs] = 1  # specks
            if f == 0 and i == 0:
                pred[8:11, 8:11] = 0  # a hole in fold 0 only
            out[f][f"{f}_{i}"] = (onehot(pred, 3, 0.8), target)
    return out


def test_postprocess_tuning_helps_and_its_nested_choice_never_sees_the_fold(tmp_path):
    data = speckled_folds(0)
    run = fake_oof_run(tmp_path, "all", data, ["bg", "a", "b"])
    tuned = tune([run])
    assert tuned.postprocess.min_area.get("a", 0) > 0  # the specks go
    assert tuned.in_sample > tuned.baseline and tuned.nested > tuned.baseline
    without0 = fake_oof_run(tmp_path, "without0", {f: data[f] for f in (1, 2)}, ["bg", "a", "b"])
    assert tune([without0]).postprocess.min_area == tuned.fold_postprocess[0].min_area
    assert tune([without0]).postprocess.fill_holes == tuned.fold_postprocess[0].fill_holes


@pytest.mark.parametrize("method", ["grid", "greedy"])
def test_per_class_weight_search_is_nested_too(tmp_path, method):
    rng = np.random.default_rng(1)
    folds = {}
    for f in range(3):
        folds[f] = {}
        for i in range(2):
            target = rng.integers(0, 3, (8, 8))
            folds[f][f"{f}{i}"] = target
    runs, without = [], []
    for r, conf in enumerate((0.7, 0.5)):
        items = {
            f: {
                k: (onehot(np.where(rng.random(t.shape) < 0.7, t, (t + 1) % 3), 3, conf), t)
                for k, t in v.items()
            }
            for f, v in folds.items()
        }
        runs.append(fake_oof_run(tmp_path, f"r{r}", items, ["bg", "a", "b"]))
        without.append(fake_oof_run(tmp_path, f"w{r}", {f: items[f] for f in (1, 2)}, ["bg", "a", "b"]))
    found = search_weights(runs, step=0.5, per_class=True, method=method)
    assert found.method == method
    assert found.weights.shape == (2, 3) and np.allclose(found.weights.sum(0), 1)
    assert set(found.fold_weights) == {0, 1, 2}
    # fold 0's weights are exactly what the whole per-class search chooses on folds 1 and 2 alone
    np.testing.assert_array_equal(
        search_weights(without, step=0.5, per_class=True, method=method).weights, found.fold_weights[0]
    )
    per_run = search_weights(runs, step=0.25, method=method)  # and so is the per-run search
    np.testing.assert_array_equal(
        search_weights(without, step=0.25, method=method).weights, per_run.fold_weights[0]
    )


def test_audit_ranks_planted_label_errors_first(tmp_path):
    items, files = {}, {}
    for i in range(10):
        target = np.zeros((16, 16), np.int64)
        target[2:10, 3:12] = 1 + i % 2
        pred = target.copy()
        if i in (3, 8):  # planted: the label says the other class
            target[target > 0] = 3 - target[target > 0]
        items[str(i)] = (onehot(pred, 3, 0.9), target)
        files[str(i)] = f"img{i}.jpg"
    run = fake_oof_run(
        tmp_path, "r", {0: dict(list(items.items())[:5]), 1: dict(list(items.items())[5:])}, ["bg", "a", "b"],
        file_names=files,
    )
    table = audit_table([run], files)
    assert set(table["file_name"].head(2)) == {"img3.jpg", "img8.jpg"}
    assert list(table["rank"]) == list(range(1, 11)) and table["score"].is_monotonic_decreasing
    assert table.loc[0, "top_confusion"].endswith("(72 px)") and "->" in table.loc[0, "top_confusion"]


def test_exclude_lists_leave_images_out_and_unknown_names_are_errors(synthetic_data, tmp_path):
    folds = pd.read_csv(synthetic_data["folds"])
    drop = folds["file_name"].iloc[:2].tolist()
    (tmp_path / "exclude.txt").write_text("# judged mislabelled\n" + "\n".join(drop) + "\n")
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["data"]["exclude"] = str(tmp_path / "exclude.txt")
    train, val, _ = build_datasets(config_from_dict(raw), 0)
    kept = {train.cache.coco.images[i].file_name for i in train.image_ids + val.image_ids}
    assert len(kept) == len(folds) - 2 and not kept & set(drop)
    (tmp_path / "bad.txt").write_text("nope.jpg\n")
    raw["data"]["exclude"] = str(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match=r"names 1 images not in the data: \['nope.jpg'\]"):
        build_datasets(config_from_dict(raw), 0)
    common = ["--data-root", str(synthetic_data["root"]), "--annotations", str(synthetic_data["train"])]
    out = tmp_path / "f.csv"
    pd.DataFrame({"file_name": drop}).to_csv(tmp_path / "exclude.csv", index=False)
    assert (
        main(["folds", *common, "--out", str(out), "--k", "2", "--exclude", str(tmp_path / "exclude.csv")])
        == 0
    )
    assert len(pd.read_csv(out)) == len(folds) - 2
    assert (
        main(["folds", *common, "--out", str(tmp_path / "g.csv"), "--exclude", str(tmp_path / "bad.txt")])
        == 1
    )


def test_cli_tune_apply_vote_and_audit_end_to_end(trained_run, synthetic_data, tmp_path, capsys):
    cfg, _ = trained_run
    run = str(cfg.output_dir / cfg.name)
    pp = tmp_path / "postprocess.json"
    assert main(["evaluate", "--runs", run, "--tune-postprocess", str(pp)]) == 0
    assert "nested" in capsys.readouterr().out
    assert json.loads(pp.read_text())["class_names"][0] == "Background"
    root, test = str(synthetic_data["root"]), str(synthetic_data["test"])
    probs = tmp_path / "p.npz"
    args = [
        "predict",
        "--runs",
        run,
        "--data-root",
        root,
        "--test",
        test,
        "--workers",
        "0",
        "--overlays",
        "0",
    ]
    assert (
        main([*args, "--out", str(tmp_path / "a.csv"), "--save-probs", str(probs), "--postprocess", str(pp)])
        == 0
    )
    ens = ["ensemble", "--probs", str(probs), str(probs), "--test", test, "--postprocess", str(pp)]
    assert main([*ens, "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()  # same route, same file
    assert main([*ens, "--vote", "hard", "--out", str(tmp_path / "c.csv")]) == 0
    assert (tmp_path / "c.csv").read_text() == (tmp_path / "a.csv").read_text()  # one file twice: same votes
    other = PostProcess(["x", "y"])
    other.save(tmp_path / "other.json")
    assert main([*ens[:-1], str(tmp_path / "other.json"), "--out", str(tmp_path / "d.csv")]) == 1
    assert "tuned for classes ['x', 'y']" in capsys.readouterr().err
    assert main([*ens, "--weights", "1,-1", "--out", str(tmp_path / "e.csv")]) == 1
    assert main(["audit", "--runs", run, "--out", str(tmp_path / "audit"), "--gallery", "3"]) == 0
    table = pd.read_csv(tmp_path / "audit" / "audit.csv")
    assert len(table) == 12 and table["file_name"].str.startswith("batch_").all()
    assert len(list((tmp_path / "audit" / "gallery").glob("*.png"))) == 3
