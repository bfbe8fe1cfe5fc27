"""Issue "The OOF tools at the floor": OOF probabilities stored as uint8 levels give the same choices as
float16 files (weights, post-processing, audit ranking, OOF mIoU), float16 files (older ones) still read, and
the maps read ahead on several threads give exactly what one thread gives."""


import numpy as np
import pandas as pd
import pytest
import torch

from competition.oof.scores import audit_table, evaluate_oof
from competition.oof.tune import tune
from competition.oof.weights import search_weights
from competition.predictions.oof import DTYPE_KEY, OofRuns, decode_probs, to_uint8
from competition.predictions.voting import combine, soft_scores

CLASSES = ["bg", "a", "b", "c"]


def _runs(root, dtype, images=16, side=48, runs=3, folds=2):
    """Runs of noisy softmax OOF maps of rectangle targets (the oof_scale recipe, small), one run noisier
    than the next; the same numbers whatever ``dtype`` stores them."""
    from tests.conftest import fake_oof_run

    rng = np.random.default_rng(0)
    targets = []
    for _ in range(images):
        t = np.zeros((side, side), np.int64)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, side - 8, 2)
            t[y : y + rng.integers(4, side // 2), x : x + rng.integers(4, side // 2)] = rng.integers(1, 4)
        targets.append(t)
    made = []
    for r in range(runs):
        rng = np.random.default_rng([1, r])
        items = {f: {} for f in range(folds)}
        for i, t in enumerate(targets):
            logits = rng.normal(0, 1.0 + 0.4 * r, (len(CLASSES), side, side)).astype(np.float32)
            np.put_along_axis(logits, t[None], np.take_along_axis(logits, t[None], 0) + 2.0, 0)
            items[i % folds][str(i)] = (torch.from_numpy(logits).softmax(0).numpy(), t)
        made.append(fake_oof_run(root, f"r{r}", items, CLASSES, dtype=dtype))
    return made


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("oof_format")
    return {dtype: _runs(root / dtype, dtype) for dtype in ("float16", "uint8")}


def test_uint8_levels_keep_every_arg_max_and_decode_to_within_half_a_level():
    probs = torch.rand(5, 64, 64).softmax(0)
    probs[:, 0, 0] = torch.tensor([0.3, 0.3001, 0.1333, 0.1333, 0.1333])  # rounds to a tie: 77 and 77
    levels = to_uint8(probs)
    assert levels.dtype == np.uint8 and levels.shape == (5, 64, 64)
    assert np.array_equal(levels.argmax(0), probs.argmax(0).numpy())
    assert np.abs(decode_probs(levels) - probs.numpy()).max() <= 1.5 / 255 + 1e-6  # rounding + the bump


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_an_image_s_maps_decode_only_when_its_probabilities_are_asked_for(both, dtype):
    """``OofRuns.read`` hands the stored maps: the class maps come from them undecoded (the same classes as
    the decoded probabilities' argmax), the runs' probabilities are decoded when first indexed, once."""
    oof = OofRuns(both[dtype], workers=1)
    key = next(iter(oof.file_names))
    _, maps, _ = oof.read(key)
    labels = maps.labels()
    assert maps.decoded is None and str(maps.stored[0].dtype) == dtype
    first = maps[0]
    assert np.array_equal(first, decode_probs(maps.stored[0])) and maps[0] is first
    assert all(np.array_equal(label, p.argmax(0)) for label, p in zip(labels, maps))
    assert len(list(maps)) == len(maps) == 3
    index = np.array([5, 0, 2303, 77])  # flat pixels, decoded alone: the numbers the whole maps have there
    fresh = oof.read(key)[1]
    picked = fresh.pixels(index)  # stored values, decoded as a map is
    assert all(str(p.dtype) == dtype and p.shape == (len(CLASSES), 4) for p in picked)
    decoded = [decode_probs(p[:, :, None])[:, :, 0] for p in picked]
    assert all(np.array_equal(p, m.reshape(len(m), -1)[:, index]) for p, m in zip(decoded, maps))
    assert fresh.decoded is None


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2], "per_class"])
def test_soft_scores_of_stored_levels_are_those_of_the_decoded_maps(both, weights):
    """The votes read uint8 levels a class at a time: bit for bit the sums of the decoded float maps, so the
    soft vote, the hard vote's tie break and the audit's numbers do not depend on how the maps arrive."""
    oof = OofRuns(both["uint8"], workers=1)
    w = np.random.default_rng(1).random((3, len(CLASSES))) if weights == "per_class" else weights
    for key in list(oof.file_names)[:4]:
        maps = oof.read(key)[1]
        direct = soft_scores(maps.stored, w)
        assert maps.decoded is None  # nothing decoded whole
        assert np.array_equal(direct, soft_scores(list(maps), w))
        assert np.array_equal(combine(maps.stored, w, vote="hard"), combine(list(maps), w, vote="hard"))


def test_uint8_and_float16_files_make_the_same_choices(both):
    stored = np.load(both["uint8"][0] / "fold0" / "oof.npz")
    assert stored["pred__0"].dtype == np.uint8 and str(stored[DTYPE_KEY].reshape(-1)[0]) == "uint8"
    scores = {k: evaluate_oof(v) for k, v in both.items()}
    assert np.abs(scores["float16"]["miou"] - scores["uint8"]["miou"]).max() < 1e-3  # every fold, run, vote
    found = {k: search_weights(v, step=0.25) for k, v in both.items()}
    assert found["float16"].weights.tolist() == found["uint8"].weights.tolist()
    assert abs(found["float16"].nested - found["uint8"].nested) < 1e-3
    tuned = {k: tune(v) for k, v in both.items()}
    for dtype, table in scores.items():  # the tuner's plain vote is evaluate's soft vote, to the last pixel
        soft = table[table["model"].str.startswith("soft vote")]["miou"]
        assert soft.tolist() == [tuned[dtype].baseline]
    assert tuned["float16"].postprocess.min_area == tuned["uint8"].postprocess.min_area
    assert tuned["float16"].postprocess.fill_holes == tuned["uint8"].postprocess.fill_holes
    files = {str(i): f"{i}.png" for i in range(16)}
    top = {k: audit_table(v, files)["file_name"].head(5).tolist() for k, v in both.items()}
    assert top["float16"] == top["uint8"]


def test_the_weight_search_samples_stored_levels_and_a_float16_run_beside_them_as_float16(both):
    """The sample keeps the stored uint8 levels (decoded when scored: the decoded maps' numbers) in fold
    order with the pixels where every run agrees first; a float16 run among uint8 ones makes it float16
    probabilities, and the search chooses as with all float16."""
    from competition.oof.sample import sample_oof

    levels = sample_oof(OofRuns(both["uint8"]), per_image=64)
    assert levels.probs.dtype == np.uint8 and levels.probs.shape[:2] == (len(CLASSES), 3)
    assert np.all(np.diff(levels.fold) >= 0)
    for start, mid, stop in levels.bounds.values():
        assert levels.agree[start:mid].all() and not levels.agree[mid:stop].any()
    mixed = [both["float16"][0], *both["uint8"][1:]]
    half = sample_oof(OofRuns(mixed), per_image=64)
    assert half.probs.dtype == np.float16
    np.testing.assert_allclose(half.probs[:, 1:], levels.probs[:, 1:] / 255, atol=1e-3)
    assert np.array_equal(half.target, levels.target)
    chosen = [search_weights(runs, step=0.25).weights.tolist() for runs in (mixed, both["float16"])]
    assert chosen[0] == chosen[1]


def test_uint8_files_are_smaller_and_files_without_the_format_key_still_read(both, tmp_path):
    size = {k: sum(p.stat().st_size for r in v for p in r.glob("fold*/oof.npz")) for k, v in both.items()}
    assert size["uint8"] < 0.75 * size["float16"]
    old = both["float16"][0] / "fold0" / "oof.npz"  # written before the key existed
    data = dict(np.load(old))
    del data[DTYPE_KEY]
    np.savez(tmp_path / "old.npz", **data)
    assert decode_probs(np.load(tmp_path / "old.npz")["pred__0"]).dtype == np.float16


def test_maps_read_ahead_on_threads_give_what_one_thread_gives(both):
    runs = both["uint8"]
    one, two = OofRuns(runs, workers=1), OofRuns(runs, workers=2)
    for (k1, f1, p1, t1), (k2, f2, p2, t2) in zip(one, two, strict=True):
        assert (k1, f1) == (k2, f2) and np.array_equal(t1, t2)
        assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("OOF_WORKERS", "1")
        single = evaluate_oof(runs)
    m2 = pytest.MonkeyPatch()
    m2.setenv("OOF_WORKERS", "2")
    try:
        pd.testing.assert_frame_equal(single, evaluate_oof(runs))
    finally:
        m2.undo()


def _timeless(tuned):
    """``tuned`` with the wall-clock time of its provenance blocks removed: two tunes a second apart differ
    only in their ``made`` stamp."""
    import dataclasses

    def strip(post):
        return dataclasses.replace(post, provenance={k: v for k, v in post.provenance.items() if k != "made"})

    fold = {k: strip(v) for k, v in tuned.fold_postprocess.items()}
    return dataclasses.replace(tuned, postprocess=strip(tuned.postprocess), fold_postprocess=fold)


def test_every_pass_gives_on_two_threads_exactly_what_it_gives_on_one(both):
    """The per-image work of each pass (confusion counts, votes, post-processing candidates, audit rows,
    the weight search's pixel sample) runs on the reading threads and is merged in image order: the same
    tables, choices and arrays as one thread, to the last bit."""
    from competition.oof.sample import sample_oof
    from competition.oof.scores import score_oof

    runs = both["uint8"]
    one, two = OofRuns(runs, workers=1), OofRuns(runs, workers=2)
    files = {key: f"{key}.png" for key in one.file_names}
    a, b = score_oof(one, [0.5, 0.3, 0.2], files=files), score_oof(two, [0.5, 0.3, 0.2], files=files)
    pd.testing.assert_frame_equal(a.frame(), b.frame())
    pd.testing.assert_frame_equal(a.audit, b.audit)
    assert all(np.array_equal(a.table.counts[k], b.table.counts[k]) for k in a.table.counts)
    assert a.table.counts.keys() == b.table.counts.keys()
    tuned = [_timeless(tune(one)), _timeless(tune(two))]
    assert tuned[0] == tuned[1]  # settings, per-fold settings, every score and all provenance but its clock
    s1, s2 = sample_oof(one), sample_oof(two)
    for field in ("probs", "target", "weight", "fold"):
        assert np.array_equal(getattr(s1, field), getattr(s2, field)), field
    assert search_weights(one, step=0.25).weights.tolist() == search_weights(two, step=0.25).weights.tolist()
    per_class = [search_weights(oof, step=0.25, per_class=True) for oof in (one, two)]
    assert per_class[0].weights.tolist() == per_class[1].weights.tolist()
    assert (per_class[0].in_sample, per_class[0].nested) == (per_class[1].in_sample, per_class[1].nested)
