"""Length buckets and the batch plan of an epoch: pure numpy over the record lengths.

The input pipeline (`pipeline`) never decides anything from the audio: from the lengths in
the record index alone, every host computes the same *global* plan of an epoch, a pure
function of (seed, epoch, lengths, config, process_count):

1. a seeded permutation of all examples of the split (a perfect shuffle, no buffer);
2. every example goes to the smallest length bucket that holds it (bucket = padded length);
3. bucket by bucket, shortest first, the examples are cut into global batches of the
   bucket's batch size; the few left over go on to the next, longer bucket (they fit), and
   the remainder of the longest bucket becomes one last batch filled up with masked
   padding examples, so no example is dropped and all batches of a bucket have one shape;
4. the batches are put in a seeded random order.

With class-balanced sampling (`classes` given to `train_plan`), step 1 is a seeded
class-balanced draw with replacement that keeps the number of examples of every bucket
(`balance.balanced_sample`), so the number of batches, and everything after step 1, is
unchanged.

With a token budget (`batch_seconds` > 0) a bucket of padded length T holds about
`batch_seconds * sample_rate / T` examples (rounded down to `batch_multiple` per host), so
every batch carries about the same amount of audio; otherwise every batch holds
`global_batch` examples, padded to its bucket. Bucket lengths come from the config, or are
derived from the split's lengths (`derive_buckets`: least total padding for the number of
buckets, lengths rounded up to `pad_multiple` samples).

Evaluation uses the same plan with the examples sorted by length and no shuffling: each
example exactly once, the last batch filled up with masked examples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from jaxser.constants import SAMPLE_RATE
from jaxser.data import balance

log = logging.getLogger(__name__)


class LayoutConfig(Protocol):
    """The fields of the pipeline config that shape buckets and batches."""

    global_batch: int  # examples per global batch when batch_seconds is 0
    buckets_seconds: tuple[float, ...]  # padded bucket lengths; () -> derive them
    num_buckets: int  # buckets to derive
    batch_seconds: float  # audio budget of a global batch; 0 -> global_batch
    sample_rate: int
    batch_multiple: int  # per-host batch sizes are multiples of this
    pad_multiple: int  # derived bucket lengths are multiples of this (samples)


def derive_buckets(
        lengths_or_histogram: np.ndarray | list | Mapping,
        num_buckets: int,
        max_samples: int = 0,
        multiple: int = 1600,
        sample_rate: int = SAMPLE_RATE,
) -> list[int]:
    """Padded bucket lengths (samples) with the least total padding for these lengths.

    Args:
        lengths_or_histogram: per-example lengths in samples, or a dataset.json
            `lengths_histogram` {"edges": [n+1 seconds], "counts": [n]} (each bin is taken
            at its upper edge, its examples at the bin middle).
        num_buckets: at most this many buckets.
        max_samples: lengths are capped here (the crop length); 0 -> no cap.
        multiple: bucket lengths are rounded up to multiples of this (capped at
            `max_samples`), so the feature frontend sees whole frames.
        sample_rate: to convert histogram edges from seconds.

    Returns the ascending bucket lengths; the last one holds the longest (capped) example.
    Exact dynamic programme over the distinct rounded lengths.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if isinstance(lengths_or_histogram, Mapping):
        edges = np.asarray(lengths_or_histogram["edges"], np.float64) * sample_rate
        counts = np.asarray(lengths_or_histogram["counts"], np.float64)
        if edges.shape[0] != counts.shape[0] + 1:
            raise ValueError("lengths_histogram needs len(edges) == len(counts) + 1")
        keep = counts > 0
        values = np.ceil(edges[1:][keep])
        sums = counts[keep] * (edges[:-1][keep] + edges[1:][keep]) / 2
        counts = counts[keep]
    else:
        values = np.asarray(lengths_or_histogram, np.float64).reshape(-1)
        counts, sums = np.ones_like(values), values.copy()
    if values.size == 0:
        raise ValueError("cannot derive buckets from no lengths")
    if max_samples:
        sums = np.where(values > max_samples, counts * max_samples, sums)
        values = np.minimum(values, max_samples)
    step = max(int(multiple), 1)
    while True:  # coarsen the grid until the programme is small
        top = np.ceil(values / step) * step
        if max_samples:
            top = np.minimum(top, max_samples)
        cand, inv = np.unique(top, return_inverse=True)
        if cand.size <= 1024:
            break
        step *= 2
    cnt = np.bincount(inv, weights=counts)
    tot = np.bincount(inv, weights=sums)
    c_cnt, c_sum = np.concatenate([[0], np.cumsum(cnt)]), np.concatenate([[0], np.cumsum(tot)])
    m = cand.size
    k_max = min(num_buckets, m)
    # cost[j, i]: padding when candidates j..i (inclusive) share the bucket cand[i].
    j = np.arange(m)[:, None]
    i = np.arange(m)[None, :]
    cost = cand[None, :] * (c_cnt[i + 1] - c_cnt[j]) - (c_sum[i + 1] - c_sum[j])
    cost = np.where(j <= i, np.maximum(cost, 0.0), np.inf)
    # best[i]: least padding of candidates 0..i with k buckets, the last one ending at i.
    best = cost[0].copy()
    first = []  # first[k][i]: first candidate of the last bucket in that solution
    for _ in range(1, k_max):
        total = best[:-1, None] + cost[1:, :]  # [j - 1, i]: last bucket starts at j
        arg = np.argmin(total, axis=0)
        first.append(arg + 1)
        best = total[arg, np.arange(m)]
    out, end = [int(cand[m - 1])], m - 1
    for arg in reversed(first):
        end = int(arg[end]) - 1
        out.append(int(cand[end]))
    return sorted(set(out))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The buckets of a split and how many examples a batch of each holds."""

    buckets: np.ndarray  # [m] padded lengths (samples), ascending
    host_batch: np.ndarray  # [m] examples per host per batch
    process_count: int

    @property
    def global_batch(self) -> np.ndarray:
        """[m] examples per global batch (all hosts) of each bucket."""
        return self.host_batch * self.process_count


@dataclasses.dataclass(frozen=True)
class Plan:
    """The batches of one epoch, over all hosts."""

    bucket: np.ndarray  # [num_batches] bucket id of each batch
    start: np.ndarray  # [num_batches] offset of each batch in `slots`
    slots: np.ndarray  # [sum of global batch sizes] example ids, -1 = padding example
    crop: np.ndarray  # [N] crop start (samples) of each example


def host_rows(plan: Plan, j: int, layout: Layout, process_index: int,
              process_count: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(bucket, ids, fill) of batch `j` of `plan` for one host: `ids` the example ids
    (-1 = padding example), `fill` the ids to read (padding repeats a real example)."""
    k = int(plan.bucket[j])
    size = int(layout.global_batch[k])
    slots = plan.slots[plan.start[j]: plan.start[j] + size]
    ids = slots[process_index:: process_count]
    fill = np.where(ids >= 0, ids, slots[slots >= 0][0])
    return k, ids, fill


def make_layout(lengths: np.ndarray, cfg: LayoutConfig, process_count: int,
                max_samples: int, host_batch: int | None = None) -> Layout:
    """Buckets for these (cropped) lengths and the per-host batch size of each.

    `host_batch` None -> from the config (`batch_seconds` budget or `global_batch`).
    """
    m = int(cfg.batch_multiple)
    if m < 1:
        raise ValueError(f"batch_multiple must be >= 1, got {m}")
    sr = cfg.sample_rate
    if cfg.buckets_seconds:
        buckets = sorted({int(round(s * sr)) for s in cfg.buckets_seconds})
        if max_samples:
            buckets = sorted({min(b, max_samples) for b in buckets})
        longest = int(lengths.max())
        if longest > buckets[-1]:
            extra = int(np.ceil(longest / cfg.pad_multiple) * cfg.pad_multiple)
            extra = min(extra, max_samples) if max_samples else extra
            log.warning("buckets_seconds end at %d samples but an example has %d: adding a "
                        "bucket of %d samples", buckets[-1], longest, extra)
            buckets.append(extra)
    else:
        buckets = derive_buckets(lengths, cfg.num_buckets, max_samples, cfg.pad_multiple, sr)
    buckets = np.asarray(buckets, np.int64)
    if host_batch is not None:
        if host_batch < 1 or host_batch % m:
            raise ValueError(f"batch size per host {host_batch} must be a positive multiple of "
                             f"batch_multiple={m}")
        sizes = np.full(buckets.shape, host_batch, np.int64)
    elif cfg.batch_seconds > 0:
        budget = cfg.batch_seconds * sr / process_count  # samples per host per batch
        sizes = np.maximum((budget // buckets).astype(np.int64) // m * m, m)
        if sizes[-1] * buckets[-1] > budget:
            log.warning("batch_seconds=%s is too small for bucket %d: using %d examples per "
                        "host", cfg.batch_seconds, buckets[-1], sizes[-1])
    else:
        if cfg.global_batch % process_count:
            raise ValueError(f"global_batch={cfg.global_batch} is not divisible by "
                             f"process_count={process_count}")
        per_host = cfg.global_batch // process_count
        if per_host < 1 or per_host % m:
            raise ValueError(f"global_batch / process_count = {per_host} must be a positive "
                             f"multiple of batch_multiple={m}")
        sizes = np.full(buckets.shape, per_host, np.int64)
    return Layout(buckets=buckets, host_batch=sizes, process_count=process_count)


def bucket_of(lengths: np.ndarray, layout: Layout) -> np.ndarray:
    """[N] the smallest bucket that holds each length."""
    return np.searchsorted(layout.buckets, lengths, side="left")


def count_batches(buckets: np.ndarray, layout: Layout) -> int:
    """Batches of a plan of examples in these buckets; depends on the counts, not the order."""
    counts = np.bincount(buckets, minlength=layout.buckets.size)
    carry, total = 0, 0
    for k, g in enumerate(layout.global_batch):
        pool = carry + int(counts[k])
        total += pool // int(g)
        carry = pool % int(g)
        if k == layout.buckets.size - 1 and carry:
            total += 1
    return total


def make_plan(order: np.ndarray, buckets: np.ndarray, layout: Layout, crop: np.ndarray,
              rng: np.random.Generator | None) -> Plan:
    """Cuts `order` into batches bucket by bucket (leftovers move up); `rng` shuffles them.

    `buckets[i]` is the bucket of example i (`bucket_of`); `crop` the crop start of each.
    """
    batches: list[np.ndarray] = []
    bucket_ids: list[int] = []
    carry = np.empty(0, np.int64)
    last = layout.buckets.size - 1
    for k, g in enumerate(layout.global_batch.tolist()):
        pool = np.concatenate([carry, order[buckets[order] == k]])
        n_full = pool.size // g
        batches.extend(pool[: n_full * g].reshape(n_full, g))
        bucket_ids.extend([k] * n_full)
        carry = pool[n_full * g:]
        if k == last and carry.size:
            batches.append(np.concatenate([carry, np.full(g - carry.size, -1, np.int64)]))
            bucket_ids.append(k)
    perm = rng.permutation(len(batches)) if rng is not None else np.arange(len(batches))
    batches = [batches[p] for p in perm]
    bucket = np.asarray(bucket_ids, np.int64)[perm] if batches else np.empty(0, np.int64)
    sizes = np.array([b.size for b in batches], np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    slots = np.concatenate(batches) if batches else np.empty(0, np.int64)
    return Plan(bucket=bucket, start=start, slots=slots.astype(np.int64), crop=crop)


def train_plan(ids: np.ndarray, lengths: np.ndarray, cropped: np.ndarray,
               buckets: np.ndarray, layout: Layout, seed: int, epoch: int,
               shuffle: bool = True, classes: np.ndarray | None = None) -> Plan:
    """The training plan of `epoch`: seeded order, batch order and random crops.

    Args:
        ids: [n] the examples in the plan (index rows).
        lengths: [N] full lengths; cropped: [N] lengths after the crop (<= lengths).
        buckets: [N] bucket of each example (`bucket_of` of `cropped`).
        shuffle: False keeps `ids` in order and the batches in bucket order.
        classes: [N] class of each example (-1: none) for a class-balanced draw instead of
            the permutation (`balance.balanced_sample`); None: every example once.
    """
    seq = np.random.SeedSequence([int(seed), int(epoch)])
    r_order, r_batches, r_crop = (np.random.default_rng(s) for s in seq.spawn(3))
    if classes is not None:
        order = balance.balanced_sample(ids, classes, buckets, layout.buckets.size, r_order)
    else:
        order = ids[r_order.permutation(ids.size)] if shuffle else ids
    over = np.maximum(lengths - cropped, 0)
    crop = np.floor(r_crop.random(lengths.size) * (over + 1)).astype(np.int64)
    return make_plan(order.astype(np.int64), buckets, layout, crop,
                     r_batches if shuffle else None)


def eval_plan(ids: np.ndarray, lengths: np.ndarray, cropped: np.ndarray,
              buckets: np.ndarray, layout: Layout) -> Plan:
    """The evaluation plan: examples sorted by (cropped) length, centre crops, no shuffle."""
    over = np.maximum(lengths - cropped, 0)
    order = ids[np.argsort(cropped[ids], kind="stable")]
    return make_plan(order, buckets, layout, over // 2, None)
