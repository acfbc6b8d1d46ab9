"""`jaxser extract`: run a frozen encoder once over every split of a prepared dataset and
keep what the heads need (the feature folder of `jaxser.data.features`).

The encoder runs jitted on the training mesh over the evaluation batches of
`jaxser.data.pipeline` (length buckets, sharded over the data axis, each record once), and
keeps per utterance the masked mean of every hidden state (and their std with
`extract.stats=mean_std`), plus the valid frames of `extract.frame_layers` in float16.
`IN_FLIGHT` batches (one when frames are kept) are dispatched before the oldest is copied
to the host and written, so the device never waits for the disk or the host.

What a feature folder guarantees:
- Identity: features.json records the encoder (family, config with its compute dtype, and
  a fingerprint of its weights: sha256 of the checkpoint files, or the seed of a random
  initialisation), the extraction options and the corpus; a call with another encoder,
  options or corpus refuses to write into it (`features.FeatureMismatch`, naming every
  difference).
- Once: a record already in the folder (by the sha1 of its record) is never encoded again:
  a second call with the same inputs returns at once ("up to date"), and the fold
  datasets of one corpus (`jaxser train --folds`) share one extraction.
- Resumable: utterances are committed in chunks (`extract.chunk`); an interrupted call
  keeps every committed chunk and the next call encodes only the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxser.constants import SAMPLE_RATE
from jaxser.data import dimensions, pipeline, records, shards
from jaxser.data import features as features_lib
from jaxser.models import cached, ser_model
from jaxser.train import probe, sharding
from jaxser.train.experiment import Experiment

log = logging.getLogger(__name__)

SECONDS_PER_PASS = {"whisper": 30.0}  # the longest input an encoder takes in one pass
# Batches dispatched and not yet copied to the host: the device (or the CPU's cores) always
# has the next ones queued while one batch's features are written. With frames kept, whose
# outputs are large (all layers of a long batch: GBs), one.
IN_FLIGHT = 3


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """What `jaxser extract` keeps (config section `extract`)."""

    stats: str = "mean"  # mean | mean_std: per-layer statistics over the valid frames
    frame_layers: str = ""  # hidden states whose frames are kept: "", "all", "last", "0,6"
    max_seconds: float = 0.0  # centre crop; 0: Whisper 30 s (one pass), others uncropped
    batch: int = 0  # utterances per global batch; 0: data.eval_batch
    chunk: int = 512  # utterances per committed chunk (the unit of resumption)

    @classmethod
    def from_config(cls, cfg) -> ExtractOptions:
        section = cfg.get("extract") or {}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: section[k] for k in names if k in section})


def parse_layers(text: str, num_layers: int, what: str = "extract.frame_layers") -> list[int]:
    """Hidden-state indices (sorted, 0 = the embeddings) from "" or "none", "all", "last",
    or indices separated by commas or spaces ("0,6", "0 -1"; negative from the end).

    On the command line a bare number or a comma list would be read as a number or a
    tuple: quote it (`--config.extract.frame_layers="'0,6'"`), or write `last` / `all`."""
    text = str(text).strip().strip("()[]")
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(num_layers))
    out = []
    for part in text.replace(",", " ").split():
        try:
            i = num_layers - 1 if part == "last" else int(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a layer index (use all, last or "
                             "indices such as 0,6 or -1)") from None
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{what}: layer {i} out of range: the encoder has {num_layers} "
                             "hidden states (0 = embeddings)")
        out.append(i % num_layers)
    return sorted(set(out))


def _request(cfg, options: ExtractOptions, source: Mapping) -> str:
    """A hash of what a call asks for (config fields, files): a repeated call with the same
    request and a complete view has nothing to do, before any weights are read."""
    m = cfg.model
    what = {"encoder": m.encoder, "size": m.size, "overrides": m.encoder_overrides.to_dict(),
            "pretrained": str(m.pretrained), "dtype": m.dtype,
            "seed": None if m.pretrained else int(cfg.seed), "backend": jax.default_backend(),
            "options": dataclasses.asdict(dataclasses.replace(options, batch=0, chunk=0)),
            "files": source.get("files")}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _identity(cfg, exp: Experiment, options: ExtractOptions, info: dict,
              recorded_source: Mapping | None) -> tuple[dict, dict, list[int]]:
    """(identity, source, frame layers) of an extraction: identity is compared with a feature
    folder's (never mixed), source (where the weights were read) is only recorded."""
    shapes = probe.encoder_shapes(exp.model.family, exp.enc_cfg)
    frame_layers = parse_layers(options.frame_layers, shapes["num_layers"])
    if options.stats not in cached.STATS:
        raise ValueError(f"extract.stats {options.stats!r}: one of {', '.join(cached.STATS)}")
    source: dict = {}
    if cfg.model.pretrained:
        source = {"pretrained": str(Path(cfg.model.pretrained).resolve()),
                  "files": probe.weights_files(cfg.model.pretrained)}
        same = recorded_source and recorded_source.get("pretrained") == source["pretrained"]
        weights = "sha256:" + probe.weights_sha256(cfg.model.pretrained,
                                                   recorded_source if same else None)
        source["sha256"] = weights[7:]
    else:
        weights = f"random:seed={int(cfg.seed)}"
    identity = {
        "encoder": {"family": cfg.model.encoder, "config": probe.encoder_fields(exp.enc_cfg),
                    "weights": weights},
        "options": {"stats": options.stats, "frame_layers": frame_layers,
                    "max_seconds": max_seconds(cfg, options)},
        "corpus": features_lib.corpus_identity(info),
        "shapes": shapes,
    }
    return identity, source, frame_layers


def max_seconds(cfg, options: ExtractOptions) -> float:
    """The centre crop of extraction (0: none)."""
    return float(options.max_seconds or SECONDS_PER_PASS.get(cfg.model.encoder, 0.0))


# --------------------------------------------------------------------------------------
# The encoder on the device


def make_encode_fn(exp: Experiment, stats: str, frame_layers: Sequence[int]):
    """The jitted `(encoder params, {audio, length}) -> layer_features(...)`; one per
    encoder and options in a process (a second extraction reuses its compiled programs)."""
    family, enc_cfg = exp.model.family, exp.enc_cfg
    key = (family, enc_cfg, stats, tuple(frame_layers), exp.mesh, exp.rules)
    if key not in _ENCODE_FNS:
        encoder = ser_model.ENCODER_FAMILIES[family][1](enc_cfg)

        def encode(params, batch):
            inputs, mask = ser_model.features(family, enc_cfg, batch["audio"], batch["length"])
            out = encoder.apply({"params": params}, inputs, mask, deterministic=True)
            return cached.layer_features(out, stats, tuple(frame_layers))

        _ENCODE_FNS.clear()
        _ENCODE_FNS[key] = jax.jit(encode)
    return _ENCODE_FNS[key]


_ENCODE_FNS: dict = {}


# --------------------------------------------------------------------------------------
# Writing chunks


class _ChunkWriter:
    """Collects this host's extracted rows and commits them chunk by chunk."""

    def __init__(self, store: features_lib.FeatureStore, size: int, with_std: bool,
                 with_frames: bool):
        self.store, self.size = store, max(int(size), 1)
        self.with_std, self.with_frames = with_std, with_frames
        self.number = store.next_chunk_number()
        self.process = jax.process_index()
        self.rows: list[dict] = []
        self.written = 0

    def add(self, key: str, row: dict) -> None:
        self.rows.append(dict(row, key=key))
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        big = {"mean": np.stack([r["mean"] for r in rows])}
        if self.with_std:
            big["std"] = np.stack([r["std"] for r in rows])
        offset = None
        if self.with_frames:
            counts = [r["frames"].shape[0] for r in rows]
            offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            big["frames"] = np.concatenate([r["frames"] for r in rows])
        numeric = {k: np.stack([r["num"][k] for r in rows]) for k in rows[0]["num"]}
        meta = {k: np.asarray([r["meta"][k] for r in rows], dtype=str)
                for k in rows[0]["meta"]}
        self.store.write_chunk(self.number, self.process, [r["key"] for r in rows], numeric,
                               meta, big, offset)
        self.number += 1
        self.written += len(rows)


def _host_rows(exp: Experiment, batch: dict, out: dict, keys: np.ndarray,
               writer: _ChunkWriter, seen: set) -> float:
    """Adds the valid rows of a host batch (`out`: the encoder's global outputs, waited for
    here) to the writer; returns their audio seconds."""
    out = sharding.host_local(out, exp.mesh, exp.rules)
    numeric_keys = [k for k in batch if k not in ("audio", "valid", "meta")]
    seconds = 0.0
    for i in np.flatnonzero(batch["valid"] > 0):
        key = str(keys[int(batch["meta"]["index"][i])])
        if key in seen:
            continue
        seen.add(key)
        count = int(out["frame_count"][i])
        row = {"mean": out["mean"][i],
               "num": {k: np.asarray(batch[k][i]) for k in numeric_keys},
               "meta": {k: str(v[i]) for k, v in batch["meta"].items() if k != "index"}}
        if "std" in out:
            row["std"] = out["std"][i]
        if "frames" in out:
            row["frames"] = np.asarray(out["frames"][i, :count])
        writer.add(key, row)
        seconds += float(batch["length"][i]) / SAMPLE_RATE
    return seconds


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------
# The driver


def extract(cfg, out_dir: str | Path | None = None, data_dir: str | Path | None = None,
            splits: Sequence[str] | None = None) -> dict:
    """Extracts the features of every split (or `splits`) of the prepared dataset
    `data_dir` (default data.dir) into `out_dir` (default data.features); returns a summary
    {features, data_dir, up_to_date, extracted, reused, splits, seconds, audio_seconds,
    audio_seconds_per_s}."""
    out_dir = Path(out_dir or cfg.data.get("features") or "")
    data_dir = Path(data_dir or cfg.data.dir or "")
    if not str(out_dir) or str(out_dir) == ".":
        raise ValueError("no feature folder: pass --out or set data.features")
    if not (data_dir / shards.DATASET_JSON).is_file():
        raise FileNotFoundError(f"no prepared dataset in {data_dir or '(data.dir unset)'}: "
                                "run `jaxser prepare` first")
    start = time.time()
    options = ExtractOptions.from_config(cfg)
    info = shards.load_dataset_info(data_dir)
    names = list(splits or info["splits"])
    fingerprint = features_lib.data_fingerprint(data_dir)
    recorded = _recorded(out_dir)
    request = _request(cfg, options, {"files": probe.weights_files(cfg.model.pretrained)
                                      if cfg.model.pretrained else None})
    done = _up_to_date(out_dir, recorded, request, fingerprint, names)
    if done is not None:
        return dict(done, seconds=time.time() - start)
    cfg = probe.audio_config(cfg)
    exp = Experiment(cfg, info["labels"], info.get("corpora", []), steps_per_epoch=1,
                     dims=dimensions.names_of(info))
    identity, source, frame_layers = _identity(cfg, exp, options, info,
                                               (recorded or {}).get("source"))
    if jax.process_index() == 0:
        store = features_lib.FeatureStore.create_or_check(out_dir, identity)
        removed = store.remove_partial()
        if removed:
            log.info("removed %d file(s) of chunks an interrupted extraction left", len(removed))
    _sync("jaxser.extract.open")
    store = features_lib.FeatureStore.create_or_check(out_dir, identity)
    table = store.key_table()
    split_keys, missing = {}, {}
    for split in names:
        index = records.load_index(data_dir, split)
        records.usable_rows(data_dir, split, index)  # Shards end where the index says.
        split_keys[split] = features_lib.record_keys(data_dir, split, index)
        missing[split] = np.asarray([i for i, k in enumerate(split_keys[split].tolist())
                                     if k not in table], np.int64)
    todo = int(sum(m.size for m in missing.values()))
    total = int(sum(k.size for k in split_keys.values()))
    audio_seconds = encode_seconds = 0.0
    if todo:
        log.info("extracting %d of %d utterances of %s into %s", todo, total, data_dir, out_dir)
        audio_seconds, encode_seconds = _encode_missing(cfg, exp, options, store, data_dir,
                                                        split_keys, missing, frame_layers)
    _sync("jaxser.extract.written")
    if jax.process_index() == 0:
        store = features_lib.FeatureStore.open(out_dir)
        store.info["source"] = source
        store.save_view(fingerprint, data_dir, info, split_keys)
        requests = list(store.info.get("requests") or [])
        store.info["requests"] = sorted(set(requests) | {request})
        store.save_info()
    _sync("jaxser.extract.view")
    elapsed = time.time() - start
    return {"features": str(out_dir), "data_dir": str(data_dir), "up_to_date": False,
            "extracted": todo, "reused": total - todo,
            "splits": {s: int(k.size) for s, k in split_keys.items()}, "seconds": elapsed,
            "encode_seconds": encode_seconds, "audio_seconds": audio_seconds,
            "audio_seconds_per_s": audio_seconds / encode_seconds if encode_seconds else 0.0}


def _recorded(out_dir: Path) -> dict | None:
    try:
        return features_lib.FeatureStore.open(out_dir).info
    except (FileNotFoundError, ValueError, features_lib.FeatureMismatch):
        return None


def _up_to_date(out_dir: Path, recorded: dict | None, request: str, fingerprint: str,
                names: Sequence[str]) -> dict | None:
    """The summary of a call with nothing to do (same request, a complete view), or None."""
    if not recorded or request not in (recorded.get("requests") or []):
        return None
    view = (recorded.get("views") or {}).get(fingerprint)
    if not view or not set(names) <= set(view.get("splits", {})):
        return None
    store = features_lib.FeatureStore.open(out_dir)
    table = store.key_table()
    keys = store.view_keys(fingerprint)
    if any(k not in table for s in names for k in keys[s].tolist()):
        return None
    total = sum(int(view["splits"][s]) for s in names)
    return {"features": str(out_dir), "data_dir": view["data_dir"], "up_to_date": True,
            "extracted": 0, "reused": total, "splits": {s: view["splits"][s] for s in names},
            "encode_seconds": 0.0, "audio_seconds": 0.0, "audio_seconds_per_s": 0.0}


def _encode_missing(cfg, exp: Experiment, options: ExtractOptions,
                    store: features_lib.FeatureStore, data_dir: Path,
                    split_keys: dict[str, np.ndarray], missing: dict[str, np.ndarray],
                    frame_layers: list[int]) -> tuple[float, float]:
    """Runs the encoder over the missing records of every split; returns (audio seconds,
    wall seconds from the first batch encoded to the last chunk written)."""
    pipe_cfg = dataclasses.replace(exp.pipe_cfg, eval_max_seconds=max_seconds(cfg, options),
                                   max_seconds=0.0, skip_corrupt=False)
    per_host = max(int(options.batch or cfg.data.eval_batch) // jax.process_count(), 1)
    per_host = -(-per_host // pipe_cfg.batch_multiple) * pipe_cfg.batch_multiple
    reader = _ReadAhead(data_dir, missing, per_host, pipe_cfg)  # Reads while we compile.
    try:
        params = probe.encoder_params(exp.model, exp.sample, int(cfg.seed), exp.mesh,
                                      exp.rules, exp.pretrained_params)
        encode = make_encode_fn(exp, options.stats, frame_layers)
        writer = _ChunkWriter(store, options.chunk, options.stats == "mean_std",
                              bool(frame_layers))
        seen: set = set()
        in_flight = 1 if frame_layers else IN_FLIGHT
        seconds, start, pending = 0.0, time.time(), collections.deque()
        with exp.mesh_context():
            for split, host in reader:
                out = encode(params, exp.device_batch({"audio": host["audio"],
                                                       "length": host["length"]}))
                pending.append((host, out, split_keys[split]))
                if len(pending) > in_flight:  # The oldest to the host while the rest run.
                    seconds += _host_rows(exp, *pending.popleft(), writer, seen)
            while pending:
                seconds += _host_rows(exp, *pending.popleft(), writer, seen)
            writer.flush()
    finally:
        reader.close()
    return seconds, time.time() - start


class _ReadAhead:
    """(split, host batch) of the missing records of every split, read by a thread a few
    batches ahead (the next split's pipeline is built while the last one's batches run)."""

    def __init__(self, data_dir: Path, missing: dict[str, np.ndarray], per_host: int,
                 pipe_cfg: pipeline.PipelineConfig, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(data_dir, missing, per_host, pipe_cfg), daemon=True,
            name="extract-read")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, data_dir, missing, per_host, pipe_cfg) -> None:
        try:
            for split, rows in missing.items():
                if rows.size:
                    for host in pipeline.eval_batches(data_dir, split, per_host, pipe_cfg,
                                                      rows=rows):
                        if not self._put((split, host)):
                            return
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
