"""Throughput and padding of the host input pipeline, against pad-to-longest batching.

Writes a few thousand random 3-5 s utterances (noise; the content does not matter here)
with the shard writer to a temporary directory, then measures, for one training epoch,
utterances/s and audio-seconds/s from the shards to ready host batches (float32, padded,
masked), and the padding fraction (padded samples / batch area). The baseline is the
classic tf.data pipeline on the same shards: stream the records, shuffle, fixed batch size,
pad to the longest example of each batch. The last line is one JSON object.

    .venv/bin/python bench/input_pipeline.py [--examples 2000] [--batch 32] [--buckets 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from jaxser.constants import SAMPLE_RATE  # noqa: E402
from jaxser.data import pipeline, shards  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  (the machine in the JSON: issue 25)

NUM_CLASSES = 8


def _examples(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        length = int(rng.uniform(3.0, 5.0) * SAMPLE_RATE)
        yield {
            "id": f"utt{i:06d}",
            "audio": rng.integers(-8000, 8000, size=length, dtype=np.int16),
            "label": rng.dirichlet(np.ones(NUM_CLASSES)).astype(np.float32),
            "speaker": f"spk{i % 50}",
            "corpus": "bench",
        }


def _measure(batches, warmup: int) -> dict:
    """Consumes `batches`; figures over all but the first `warmup` batches."""
    utts = samples = area = 0
    start = None
    for n, b in enumerate(batches):
        if n == warmup:
            start = time.perf_counter()
            utts = samples = area = 0
        utts += int(b["valid"].sum())
        samples += int(b["length"][b["valid"] > 0].sum())
        area += int(b["audio"].size)
    elapsed = time.perf_counter() - start
    return {
        "utterances_per_s": round(utts / elapsed, 1),
        "audio_seconds_per_s": round(samples / SAMPLE_RATE / elapsed, 1),
        "padding_fraction": round(1.0 - samples / area, 4),
    }


def _baseline(data_dir: str, batch: int, epochs: int):
    """Stream, shuffle, fixed batch size, pad to the longest of each batch."""
    spec = shards.parse_spec(NUM_CLASSES)

    def parse(x):
        ex = tf.io.parse_single_example(x, spec)
        audio = tf.cast(tf.io.decode_raw(ex["audio"], tf.int16), tf.float32) / 32768.0
        return {"audio": audio, "length": tf.cast(ex["length"], tf.int32),
                "label": ex["label"], "valid": tf.ones([], tf.float32)}

    files = shards.split_files(data_dir, "train")
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=0)
    ds = ds.interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.shuffle(1024, seed=0).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.repeat(epochs).padded_batch(batch).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32, help="baseline batch; budget = batch * 4 s")
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dir", default="", help="reuse shards here (written if missing)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.dir or tmp
        if not os.path.exists(os.path.join(data_dir, shards.index_name("train"))):
            t0 = time.perf_counter()
            shards.write_split(data_dir, "train", _examples(args.examples, 0), NUM_CLASSES,
                               target_shard_bytes=50_000_000)
            print(f"wrote {args.examples} examples in {time.perf_counter() - t0:.1f} s")
        cfg = pipeline.PipelineConfig(batch_seconds=args.batch * 4.0, num_buckets=args.buckets,
                                      sample_rate=SAMPLE_RATE)
        it = pipeline.train_iterator(data_dir, "train", cfg, process_index=0, process_count=1)
        steps = it.steps_per_epoch * args.epochs
        print(f"buckets (samples, batch): {it.buckets}; {it.steps_per_epoch} batches/epoch")
        warmup = max(steps // 20, 2)
        ours = _measure((next(it) for _ in range(steps)), warmup)
        print("bucketed:", ours)
        base_steps = args.examples * args.epochs // args.batch
        base = _measure((b for _, b in zip(range(base_steps),
                                           _baseline(data_dir, args.batch, args.epochs),
                                           strict=False)), warmup)
        print("pad-to-longest:", base)
    print(json.dumps({**ours, "baseline": base, "machine": common.machine(with_torch=False)}))


if __name__ == "__main__":
    main()
