"""Host input pipeline: per-host coverage, eval padding, shuffling, exact resume, buckets."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxser.data import buckets, pipeline, shards

K = 3
SR = 100  # a tiny sample rate keeps the arrays small: lengths of 0.5-4 "seconds"


def _examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{
        "id": f"u{seed}_{i:03d}",
        "audio": rng.integers(-32768, 32767, size=int(rng.integers(50, 400)), dtype=np.int16),
        "label": rng.dirichlet(np.ones(K)).astype(np.float32),
        "domain": i % 2,
        "speaker": f"s{i % 4}",
        "corpus": "c",
        "gender": "f",
    } for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    splits = {"train": _examples(37, 0), "test": _examples(11, 1), "tiny": _examples(2, 2)}
    for split, exs in splits.items():
        shards.write_split(d, split, exs, K, target_shard_bytes=2500)
    by_id = {e["id"]: e for exs in splits.values() for e in exs}
    return str(d), splits, by_id


def _cfg(**kw) -> pipeline.PipelineConfig:
    base = dict(global_batch=4, sample_rate=SR, pad_multiple=10, num_buckets=3)
    return pipeline.PipelineConfig(**{**base, **kw})


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _ids(batch: dict) -> list[str]:
    return [i for i, v in zip(batch["meta"]["id"], batch["valid"], strict=True) if v > 0]


def _check_batch(b: dict, by_id: dict, crop: str = "none", max_len: int = 0) -> None:
    """Shapes and dtypes, zero padding, masks, and the audio against the source."""
    n, t = b["audio"].shape
    assert b["audio"].dtype == np.float32 and b["label"].shape == (n, K)
    for k, dt in [("length", np.int32), ("class_index", np.int32), ("domain", np.int32),
                  ("valid", np.float32)]:
        assert b[k].shape == (n,) and b[k].dtype == dt, k
    assert set(b["meta"]) == {*shards.TEXT_KEYS, "index"}
    assert (b["length"] >= 1).all() and (b["length"] <= t).all()
    pad = np.arange(t)[None, :] >= b["length"][:, None]
    assert (b["audio"][pad] == 0).all()
    for i in range(n):
        if b["valid"][i] == 0:
            assert b["meta"]["id"][i] == "" and b["meta"]["index"][i] == -1
            continue
        ex = by_id[b["meta"]["id"][i]]
        src = ex["audio"].astype(np.float32) / 32768.0
        got = b["audio"][i, : b["length"][i]]
        np.testing.assert_array_equal(b["label"][i], ex["label"])
        assert b["class_index"][i] == np.argmax(ex["label"])
        assert b["meta"]["speaker"][i] == ex["speaker"]
        if crop == "none" or src.size <= max_len:
            np.testing.assert_array_equal(got, src)
        elif crop == "centre":
            start = (src.size - max_len) // 2
            np.testing.assert_array_equal(got, src[start: start + max_len])
        else:  # random crop: a contiguous window of the source
            assert got.size == max_len
            windows = np.lib.stride_tricks.sliding_window_view(src, max_len)
            assert (windows == got).all(axis=1).any()


# --------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("kw", [{}, {"batch_seconds": 8.0}, {"max_seconds": 2.0},
                                {"buckets_seconds": (1.0, 2.0)}])
def test_each_example_once_per_epoch_across_two_hosts(data, kw):
    d, splits, by_id = data
    cfg = _cfg(**kw)
    its = [pipeline.train_iterator(d, "train", cfg, process_index=h, process_count=2)
           for h in range(2)]
    steps = its[0].steps_per_epoch
    assert steps == its[1].steps_per_epoch == pipeline.epoch_steps(d, "train", cfg, 2)
    for epoch in range(2):
        seen = []
        for _ in range(steps):
            b0, b1 = next(its[0]), next(its[1])
            assert b0["audio"].shape == b1["audio"].shape  # same shape on all hosts
            for b in (b0, b1):
                crop = "random" if cfg.max_seconds else "none"
                _check_batch(b, by_id, crop, int(cfg.max_seconds * SR))
                seen += _ids(b)
        assert sorted(seen) == sorted(e["id"] for e in splits["train"]), epoch
        assert its[0].epoch == epoch + 1 and its[0].step == 0


def test_fewer_files_than_hosts(data):
    d, splits, _ = data
    assert len(shards.split_files(d, "tiny")) == 1
    its = [pipeline.train_iterator(d, "tiny", _cfg(global_batch=3), process_index=h,
                                   process_count=3) for h in range(3)]
    seen = [i for it in its for b in _take(it, it.steps_per_epoch) for i in _ids(b)]
    assert sorted(seen) == sorted(e["id"] for e in splits["tiny"])


def test_shuffle_same_seed_same_order_new_epoch_new_order(data):
    d, _, _ = data
    steps = pipeline.epoch_steps(d, "train", _cfg(), 1)

    def order(seed):
        it = pipeline.train_iterator(d, "train", _cfg(seed=seed), process_index=0,
                                     process_count=1)
        return [_ids(b) for b in _take(it, 2 * steps)]

    a, b, c = order(0), order(0), order(1)
    assert a == b
    assert a[:steps] != a[steps:]  # another epoch, another order
    assert a[:steps] != c[:steps]  # another seed, another order


@pytest.mark.parametrize("kw", [{}, {"batch_seconds": 8.0, "max_seconds": 2.5}])
def test_resume_is_exact(data, kw):
    d, _, _ = data
    cfg = _cfg(**kw)

    def make(state=None):
        return pipeline.train_iterator(d, "train", cfg, state=state, process_index=1,
                                       process_count=2)

    it = make()
    steps = it.steps_per_epoch
    full = _take(it, 2 * steps + 3)
    for k in (3, steps - 1, steps, steps + 2):
        it = make()
        _take(it, k)
        state = json.loads(json.dumps(it.state()))  # JSON round trip
        assert state["epoch"] == k // steps and state["step"] == k % steps
        resumed = make(state)
        for want, got in zip(full[k:], _take(resumed, len(full) - k), strict=True):
            assert want["meta"]["id"].tolist() == got["meta"]["id"].tolist()
            np.testing.assert_array_equal(want["audio"], got["audio"])
            np.testing.assert_array_equal(want["valid"], got["valid"])


def test_resume_rejects_another_dataset(data):
    d, _, _ = data
    it = pipeline.train_iterator(d, "train", _cfg(), process_index=0, process_count=1)
    next(it)
    state = {**it.state(), "num_examples": 5}
    with pytest.raises(ValueError, match="examples"):
        pipeline.train_iterator(d, "train", _cfg(), state=state, process_index=0,
                                process_count=1)


def test_shapes_bounded_by_buckets_and_one_compile_per_bucket(data):
    d, _, _ = data
    cfg = _cfg(batch_seconds=8.0, num_buckets=3)
    it = pipeline.train_iterator(d, "train", cfg, process_index=0, process_count=1)
    traces = collections.Counter()

    @jax.jit
    def step(audio, length, valid):
        traces[audio.shape] += 1
        mask = jnp.arange(audio.shape[1])[None, :] < length[:, None]
        return jnp.sum(jnp.where(mask, audio, 0.0) * valid[:, None])

    shapes = set()
    for b in _take(it, 2 * it.steps_per_epoch):
        shapes.add(b["audio"].shape)
        step(b["audio"], b["length"], b["valid"]).block_until_ready()
    assert len(shapes) <= len(it.buckets) <= 3
    assert {s for s, _ in it.buckets} == {t for _, t in shapes}
    assert all(v == 1 for v in traces.values()) and len(traces) == len(shapes)
    # Token budget: each batch holds at most ~8 s of padded audio.
    assert all(n * t <= 8.0 * SR for n, t in shapes)


def test_batch_multiple_and_divisibility(data):
    d, _, _ = data
    it = pipeline.train_iterator(d, "train", _cfg(batch_seconds=10.0, batch_multiple=2),
                                 process_index=0, process_count=1)
    assert all(n % 2 == 0 for _, n in it.buckets)
    assert next(it)["audio"].shape[0] % 2 == 0
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_iterator(d, "train", _cfg(global_batch=5), process_index=0,
                                process_count=2)
    with pytest.raises(ValueError, match="batch_multiple"):
        pipeline.train_iterator(d, "train", _cfg(global_batch=6, batch_multiple=4),
                                process_index=0, process_count=2)


# --------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("hosts", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 5, None])
@pytest.mark.parametrize("split", ["test", "tiny"])
def test_eval_covers_everything_once(data, hosts, batch_size, split):
    d, splits, by_id = data
    cfg = _cfg(batch_seconds=6.0)
    per_host = [list(pipeline.eval_batches(d, split, batch_size, cfg, process_index=h,
                                           process_count=hosts)) for h in range(hosts)]
    n_steps = pipeline.eval_steps(d, split, batch_size, cfg, hosts)
    assert all(len(bs) == n_steps for bs in per_host)  # same number of batches everywhere
    seen = []
    for step in zip(*per_host, strict=True):
        assert len({b["audio"].shape for b in step}) == 1
        for b in step:
            if batch_size:
                assert b["audio"].shape[0] == batch_size
            _check_batch(b, by_id)
            seen += _ids(b)
    assert sorted(seen) == sorted(e["id"] for e in splits[split])


def test_eval_centre_crop(data):
    d, splits, by_id = data
    cfg = _cfg(eval_max_seconds=1.5)
    batches = list(pipeline.eval_batches(d, "test", 4, cfg, process_index=0, process_count=1))
    for b in batches:
        _check_batch(b, by_id, "centre", 150)
        assert b["audio"].shape[1] <= 150
    assert sum(len(_ids(b)) for b in batches) == len(splits["test"])


# --------------------------------------------------------------------------------------
# Buckets


def _padding(lengths: np.ndarray, buckets: list[int]) -> int:
    b = np.asarray(buckets)
    return int((b[np.searchsorted(b, lengths)] - lengths).sum())


def test_derive_buckets_is_optimal():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200) * 10
    got = buckets.derive_buckets(lengths, 3, multiple=10)
    assert len(got) == 3 and got[-1] == lengths.max()
    cands = np.unique(lengths)
    best = min(_padding(lengths, [a, b, int(lengths.max())])
               for a, b in itertools.combinations(cands[:-1].tolist(), 2))
    assert _padding(lengths, got) == best


def test_derive_buckets_cap_histogram_and_multiple():
    lengths = np.array([48000, 50000, 64000, 70000, 90000])
    capped = buckets.derive_buckets(lengths, 2, max_samples=64000, multiple=1600)
    assert capped[-1] == 64000 and all(b <= 64000 for b in capped)
    assert all(b % 1600 == 0 for b in buckets.derive_buckets(lengths, 3, multiple=1600))
    hist = shards.length_histogram(lengths, 16000, 0.5)
    from_hist = buckets.derive_buckets(hist, 2, sample_rate=16000)
    assert from_hist[-1] >= lengths.max() and len(from_hist) == 2


def test_config_from_mapping():
    cfg = pipeline.PipelineConfig.from_mapping(
        {"global_batch": 8, "buckets_seconds": [1.0, 2.0], "unrelated": 1})
    assert cfg.global_batch == 8 and cfg.buckets_seconds == (1.0, 2.0)
    assert dataclasses.replace(cfg, seed=3).seed == 3


def test_random_crop_changes_with_the_epoch(data):
    d, _, by_id = data
    it = pipeline.train_iterator(d, "train", _cfg(max_seconds=1.0), process_index=0,
                                 process_count=1)
    crops = collections.defaultdict(set)
    for b in _take(it, 3 * it.steps_per_epoch):
        for i, name in enumerate(b["meta"]["id"]):
            if b["valid"][i] and by_id[name]["audio"].size > 200:
                crops[name].add(b["audio"][i, :100].tobytes())
    assert crops and all(len(v) > 1 for v in crops.values())


def test_stale_index_is_detected(tmp_path):
    shards.write_split(tmp_path, "train", _examples(6, 3), K)
    idx = np.load(tmp_path / shards.index_name("train"))
    shards.write_split(tmp_path, "train", _examples(6, 4), K)
    np.savez(tmp_path / shards.index_name("train"), **idx)  # the old index
    with pytest.raises(ValueError, match="index"):
        pipeline.train_iterator(str(tmp_path), "train", _cfg(), process_index=0,
                                process_count=1)
