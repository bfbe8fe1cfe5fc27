"""Combining several members' class probabilities into one class-index map: weighted soft voting (per member
or per member and class) and hard (majority) voting."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..core.metrics import argmax_classes
from ..core.runtime import normalize_weights
from .oof import from_levels
from .submission import mask_from_probs, resize_probs


def soft_scores(
    probs: Sequence[np.ndarray], weights: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """``sum_r w[r, c] p_r[c]`` of members' probabilities ``[C, ...]``; ``weights`` per member or per member
    and class (see ``class_weights``). With per-member weights this is their weighted mean. A uint8 member is
    the levels an OOF file stores (``ImageMaps.stored``), read a class at a time as ``oof.from_levels`` reads
    them: the same sums, without a float copy of each member."""
    w = class_weights(weights, len(probs), probs[0].shape[0]).astype(np.float32)
    shape = (-1,) + (1,) * (probs[0].ndim - 1)
    total = np.zeros(probs[0].shape, np.float32)
    for r, p in enumerate(probs):  # member by member: no [R, C, ...] float32 stack
        if p.dtype == np.uint8:
            for c, levels in enumerate(p):
                row = from_levels(levels)
                row *= w[r, c]
                total[c] += row
        else:
            total += w[r].reshape(shape) * p
    return total


def class_weights(weights: np.ndarray | Sequence[float] | None, members: int, classes: int) -> np.ndarray:
    """``[members, classes]`` weights: one weight per member (``[members]``) for every class, or one per
    member and class; each class's column is checked and scaled to sum 1."""
    w = np.ones(members) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        return np.repeat(normalize_weights(w, members)[:, None], classes, axis=1)
    if w.shape != (members, classes):
        raise ValueError(f"per-class weights of shape {w.shape} for {members} members and {classes} classes")
    return np.stack([normalize_weights(w[:, c], members) for c in range(classes)], axis=1)


def combine(probs: Sequence[np.ndarray], weights: np.ndarray | None = None, vote: str = "soft") -> np.ndarray:
    """Class-index map of several members' probabilities ``[C, H, W]``.

    ``soft``: argmax over classes of ``sum_r w[r, c] p_r[c]`` (``weights`` per member or per member and class,
    see ``class_weights``). ``hard``: each member's argmax is a vote of its weight; a tie between classes goes
    to the one of larger weighted probability sum (so a member of weight 0 has no say at all).
    """
    if vote == "soft":
        return soft_vote(probs, weights)
    if vote != "hard":
        raise ValueError(f"vote must be 'soft' or 'hard', got {vote!r}")
    return hard_vote([argmax_classes(p) for p in probs], soft_scores(probs, weights), weights)


def soft_vote(
    probs: Sequence[np.ndarray],
    weights: np.ndarray | Sequence[float] | None = None,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Class map of ``combine``'s soft vote. Members stored as uint8 levels (``ImageMaps.stored``) with
    weights that are whole multiples of some ``1 / m`` (equal weights, a search's grid: ``whole_weights``)
    vote on exact integer sums (``level_vote``): the float sums give the same classes except where two
    classes' sums tie, which rounding breaks either way and the integer vote gives to the first class.
    Otherwise the arg-max of ``scores`` (``soft_scores``, computed when not given)."""
    counts = _level_counts(probs, weights)
    if counts is not None:
        return level_vote(probs, counts)
    return argmax_classes(soft_scores(probs, weights) if scores is None else scores)


WHOLE_LIMIT = 1000  # the largest denominator m of weights that vote on exact integer sums (k / m each)


def whole_weights(weights: np.ndarray, limit: int = WHOLE_LIMIT) -> np.ndarray | None:
    """Non-negative ``weights`` (any shape) as whole numbers ``k = m * weights`` for the smallest ``m <=
    limit`` that makes every one whole (to 1e-9 each), else ``None``. A vote with ``k`` picks what a vote with
    ``weights`` picks (one scale for all), on integer sums."""
    flat = np.asarray(weights, np.float64).reshape(-1)
    if not np.isfinite(flat).all() or (flat < 0).any():
        return None
    m = np.arange(1, limit + 1, dtype=np.float64)
    scaled = m[:, None] * flat
    whole = (np.abs(scaled - np.rint(scaled)) <= 1e-9 * m[:, None]).all(1)
    if not whole.any():
        return None
    return np.rint(scaled[int(np.argmax(whole))]).astype(np.int64).reshape(np.shape(weights))


def level_vote(levels: Sequence[np.ndarray], counts: np.ndarray | None = None) -> np.ndarray:
    """Arg-max over classes of the uint8 ``levels`` ``[C, ...]`` of every member summed with whole weights
    ``counts`` (``[members, C]``; ``None``: one each), ties to the first class: a max over packed ``(sum,
    last class - class)`` keys, in 16 bits when they fit (5 members of 11 classes with one each do), no
    float sums. The caller keeps the keys within 32 bits (``_level_counts``)."""
    classes = levels[0].shape[0]
    k = np.ones((len(levels), classes), np.int64) if counts is None else np.asarray(counts, np.int64)
    bits = (classes - 1).bit_length()
    dtype = np.uint16 if _key_bits(k, classes) <= 16 else np.uint32
    shape = (-1,) + (1,) * (levels[0].ndim - 1)
    keys = levels[0].astype(dtype)
    if (k[0] != 1).any():
        keys *= k[0].astype(dtype).reshape(shape)
    for member, weight in zip(levels[1:], k[1:]):
        if (weight == 1).all():
            keys += member
        elif weight.any():
            keys += member * weight.astype(dtype).reshape(shape)
    keys <<= bits
    keys |= ((1 << bits) - 1 - np.arange(classes, dtype=dtype)).reshape(shape)
    best = keys.max(0)
    best &= (1 << bits) - 1
    return (1 << bits) - 1 - best.astype(np.intp)


def _level_counts(
    probs: Sequence[np.ndarray], weights: np.ndarray | Sequence[float] | None
) -> np.ndarray | None:
    """The whole weights ``[members, C]`` with which ``level_vote`` gives the soft vote of ``probs``, or
    ``None``: a member not stored as uint8 levels, weights on no denominator up to ``WHOLE_LIMIT``, or sums
    too large for 32-bit keys."""
    if not all(p.dtype == np.uint8 for p in probs):
        return None
    key = None if weights is None else (np.asarray(weights, np.float64).tobytes(), np.shape(weights))
    return _whole_class_weights(key, len(probs), probs[0].shape[0])


@functools.lru_cache(maxsize=8)
def _whole_class_weights(key: tuple | None, members: int, classes: int) -> np.ndarray | None:
    """``whole_weights`` of ``class_weights`` (cached: a pass votes every image with the same weights)."""
    weights = None if key is None else np.frombuffer(key[0], np.float64).reshape(key[1])
    counts = whole_weights(class_weights(weights, members, classes))
    if counts is None or _key_bits(counts, classes) > 32:
        return None
    counts.setflags(write=False)
    return counts


def _key_bits(counts: np.ndarray, classes: int) -> int:
    """Bits of ``level_vote``'s packed keys: the largest weighted level sum of a class, then the class."""
    return (255 * int(counts.sum(0).max())).bit_length() + (classes - 1).bit_length()


TIED = 255  # a vote table's entry where classes tie on votes (the summed probabilities decide)
TABLE_LIMIT = 2**21  # the most label combinations (classes ** members) a vote table covers; 11 ** 6 fits
CHUNK = 2**18  # combinations voted at a time while a table is built


def hard_vote(
    labels: Sequence[np.ndarray], soft: np.ndarray, weights: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """The hard vote of ``combine`` from the members' argmax maps ``labels`` and their soft scores ``soft``
    ``[C, ...]`` (``soft_scores``), for callers that have both already.

    The winner depends only on the members' labels, so it is looked up in a table over every combination of
    labels (``vote_table``, cached per weights); only where classes tie on votes are the summed probabilities
    read, for those pixels alone. Beyond ``TABLE_LIMIT`` combinations every pixel is voted directly."""
    classes, pixels = soft.shape[0], soft[0].size
    w = class_weights(weights, len(labels), classes)
    flat = [np.asarray(label).reshape(-1) for label in labels]
    scores = soft.reshape(classes, pixels)
    if classes >= TIED or classes ** len(flat) > TABLE_LIMIT:
        return _vote(flat, scores, w).reshape(soft.shape[1:])
    code = np.zeros(pixels, np.int32)
    for label in reversed(flat):  # sum_r label_r * classes ** r, Horner's way
        code *= classes
        code += label
    out = np.take(vote_table(w.tobytes(), len(flat), classes), code).astype(np.intp)
    tied = np.flatnonzero(out == TIED)
    if tied.size:
        out[tied] = _vote([label[tied] for label in flat], scores[:, tied], w)
    return out.reshape(soft.shape[1:])


@functools.lru_cache(maxsize=8)
def vote_table(weights: bytes, members: int, classes: int) -> np.ndarray:
    """uint8 winner of every combination of ``members`` labels (entry ``sum_r label_r * classes ** r``) under
    the float64 ``[members, classes]`` ``weights`` (as bytes, to be cached); ``TIED`` where several classes
    tie on votes."""
    w = np.frombuffer(weights, np.float64).reshape(members, classes)
    total = classes**members
    table = np.empty(total, np.uint8)
    for start in range(0, total, CHUNK):
        codes = np.arange(start, min(total, start + CHUNK))
        labels = [codes // classes**r % classes for r in range(members)]
        winners = _winners(labels, w, classes)
        table[codes] = np.where(winners.sum(0) == 1, winners.argmax(0), TIED)
    return table


def _winners(labels: Sequence[np.ndarray], w: np.ndarray, classes: int) -> np.ndarray:
    """``[C, pixels]``: the classes of (near-)most votes, each member adding its weight ``w[r, label]``."""
    pixels = labels[0].size
    votes = np.zeros(classes * pixels, np.float64)  # [C, pixels], a member's weight added where it chose c
    offset = np.arange(pixels)
    for r, label in enumerate(labels):
        label = label.astype(np.intp, copy=False)
        votes[label * pixels + offset] += w[r][label]  # in member order, as a per-class sum adds them
    votes = votes.reshape(classes, pixels)
    top = votes.max(0)
    return top - votes <= 1e-8 + 1e-5 * top  # np.isclose(votes, top): the same numbers, votes <= top


def _vote(labels: Sequence[np.ndarray], scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The hard vote of flat ``labels`` with their ``[C, pixels]`` soft ``scores``: among the classes of most
    votes, the one of the largest score (then the lowest class)."""
    winners = _winners(labels, w, scores.shape[0])
    return argmax_classes(np.where(winners, scores, -1.0))


def vote_mask(
    members: Sequence[np.ndarray], weights: np.ndarray | None, vote: str, size: int | None
) -> np.ndarray:
    """Submission mask of several members' probabilities: resized to ``size`` first (the one route of
    ``submission.mask_from_probs``), then soft-voted (weighted sum, argmax) or hard-voted."""
    if vote == "soft":
        return mask_from_probs(soft_scores(members, weights), size)
    resized = [resize_probs(m, size).half().numpy() for m in members]
    return combine(resized, weights, vote).astype(np.uint8)
