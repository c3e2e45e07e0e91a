"""Non-dominated points over three objectives, for the ``pareto`` view: a sort and a sweep.

``front_mask(q, w, lat)``: which points no other point beats on quality ``q`` (higher is
better), weight ``w`` and latency ``lat`` (both lower is better) at once. A point dominates
another when it is at least as good on all three and better on one; identical points do not
dominate each other (both or neither are on the front).

Sorted by (q descending, w ascending, lat ascending), every dominator of a point comes before
it, and an earlier point that is distinct and no worse on w and lat dominates it. So the
question for each point is a prefix minimum: the lowest latency among earlier points of no
greater weight. With few distinct weights (a sweep's weights follow from bits, group size and
format) that is one running minimum per weight level; with many, a sweep over the weight
levels keeps the (quality, latency) staircase of the lighter levels.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MATRIX_LIMIT = 1 << 20  # levels x points per running-minimum batch; a larger group is swept by level


def front_mask(q: np.ndarray, w: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """True where the point is non-dominated; no NaN in any input (lat may be +inf)."""
    return front_mask_grouped(np.zeros(len(q), dtype=np.int64), q, w, lat)


def front_mask_grouped(group: np.ndarray, q: np.ndarray, w: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """``front_mask`` within each group (points of different groups never compare), every
    group at once."""
    n = len(q)
    mask = np.ones(n, dtype=bool)
    if n <= 1:
        return mask
    order = np.lexsort((lat, w, -q, group))
    gs, qs, ws, ls = group[order], q[order], w[order], lat[order]
    # identical points are adjacent: judge the first of each run, copy to the rest
    first = np.ones(n, dtype=bool)
    first[1:] = (gs[1:] != gs[:-1]) | (qs[1:] != qs[:-1]) | (ws[1:] != ws[:-1]) | (ls[1:] != ls[:-1])
    run = np.cumsum(first) - 1
    ug, uq, uw, ul = gs[first], qs[first], ws[first], ls[first]
    level = _levels(ug, uw)
    starts = np.flatnonzero(np.r_[True, ug[1:] != ug[:-1]])
    sizes = np.diff(np.r_[starts, len(ug)])
    levels = np.maximum.reduceat(level, starts) + 1
    dominated = np.zeros(len(ug), dtype=bool)
    big = levels * sizes > MATRIX_LIMIT
    for start, size in zip(starts[big].tolist(), sizes[big].tolist()):
        part = slice(start, start + size)
        dominated[part] = _dominated_sweep(-uq[part], level[part], ul[part])
    rank = np.unique(ul, return_inverse=True)[1].reshape(-1)  # +inf is a latency too: no sentinel clash
    small = np.flatnonzero(~big)
    small = small[np.argsort(levels[small], kind="stable")]  # groups of alike level counts together
    while len(small):
        cost = np.maximum.accumulate(levels[small]) * np.cumsum(sizes[small])
        take = max(1, int(np.searchsorted(cost, MATRIX_LIMIT, side="right")))
        chosen = np.sort(small[:take])
        small = small[take:]
        index = np.repeat(starts[chosen] - np.r_[0, np.cumsum(sizes[chosen])[:-1]], sizes[chosen])
        index += np.arange(len(index))
        batch_group = np.repeat(np.arange(len(chosen)), sizes[chosen])
        dominated[index] = _dominated_matrix(batch_group, level[index], rank[index], int(levels[chosen].max()))
    mask[order] = ~dominated[run]
    return mask


def _levels(group: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Dense rank of each weight within its group (0 = lightest)."""
    order = np.lexsort((w, group))
    g, ws = group[order], w[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    count = np.cumsum(new_group | np.r_[True, ws[1:] != ws[:-1]]) - 1
    level = np.empty(len(w), dtype=np.int64)
    level[order] = count - np.maximum.accumulate(np.where(new_group, count, 0))
    return level


def _dominated_matrix(group: np.ndarray, level: np.ndarray, rank: np.ndarray, k: int) -> np.ndarray:
    """Point t (sweep order, groups contiguous) is dominated when an earlier point of its group
    at a level <= its own has latency rank <= its own: one running minimum per level. Ranks
    are shifted down by group so that an earlier group's values never reach a later group's."""
    span = int(rank.max()) + 2
    shifted = (rank - group * span).astype(np.int64)
    absent = span - 1 - group * span  # above every rank of its group, below every earlier group's
    masked = np.where(level[None, :] <= np.arange(k)[:, None], shifted[None, :], absent[None, :])
    running = np.minimum.accumulate(masked, axis=1)
    dominated = np.zeros(len(rank), dtype=bool)
    dominated[1:] = running[level[1:], np.arange(len(rank) - 1)] <= shifted[1:]
    return dominated


def _dominated_sweep(neg_q: np.ndarray, level: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The same answer level by level: a point is dominated by an earlier point of its own
    level with latency <= its own, or by a lighter point with quality >= and latency <= its
    own (the lighter levels' staircase, sorted by quality, holds the running minimum)."""
    dominated = np.zeros(len(lat), dtype=bool)
    stair_q = np.empty(0)  # -quality ascending
    stair_lat = np.empty(0)  # running minimum of latency along it
    by_level = np.argsort(level, kind="stable")
    bounds = np.flatnonzero(np.diff(level[by_level])) + 1
    for idx in np.split(by_level, bounds):  # idx ascending: sweep order within the level
        own = np.minimum.accumulate(lat[idx])
        hit = np.zeros(len(idx), dtype=bool)
        hit[1:] = own[:-1] <= lat[idx][1:]
        if len(stair_q):
            at = np.searchsorted(stair_q, neg_q[idx], side="right") - 1
            hit |= (at >= 0) & (stair_lat[np.maximum(at, 0)] <= lat[idx])
        dominated[idx] = hit
        keep = idx[~hit]
        merged_q = np.concatenate([stair_q, neg_q[keep]])
        merged_lat = np.concatenate([stair_lat, lat[keep]])
        order = np.lexsort((merged_lat, merged_q))
        stair_q, stair_lat = merged_q[order], np.minimum.accumulate(merged_lat[order])
    return dominated


def front_udf(points: pa.ListArray | pa.ChunkedArray) -> pa.ListArray:
    """DuckDB arrow function: one list of {q, w, lat} structs per group in, one list of
    booleans (on the front) per group out; every group of the chunk at once."""
    if isinstance(points, pa.ChunkedArray):
        points = points.combine_chunks()
    offsets = points.offsets.to_numpy()
    base, end = int(offsets[0]), int(offsets[-1])
    values = points.values.slice(base, end - base)
    q = values.field("q").to_numpy(zero_copy_only=False)
    w = values.field("w").to_numpy(zero_copy_only=False)
    lat = values.field("lat").to_numpy(zero_copy_only=False)
    group = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    flags = pa.array(front_mask_grouped(group, q, w, lat))
    return pa.ListArray.from_arrays(pa.array(offsets - base, type=pa.int32()), flags)
