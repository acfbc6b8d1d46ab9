"""One training epoch over one prepared corpus: jaxser against the transformers PyTorch recipe.

Both sides train the same architecture (random init, every dropout and LayerDrop off) with
the same loss (KL to the label distributions) and AdamW, over the same examples of the
same prepared split, with the same global batch in utterances, in one run; their epochs
alternate (jaxser, PyTorch, jaxser, PyTorch) so that a change in the machine's load hits
both. jaxser runs in a child process driven by this one, PyTorch in this process: their
peak memory together would not fit a 24 GiB machine with HuBERT at batch 16.

- jaxser: the real trainer path. `Experiment` (model, optimizer, jitted donated step
  with the on-device log-mel / waveform normalisation), the host pipeline with length
  buckets (`jaxser.data.pipeline.train_iterator`), variable-length Whisper. The first
  epoch includes compiling the step once per bucket (a user pays it); the second is
  the steady state.
- PyTorch: the usual transformers recipe. A `torch.utils.data.DataLoader` with worker
  processes reads the same records and collates them with the feature extractor:
  Whisper: `WhisperFeatureExtractor` (log-mel, padded to 30 s) + `WhisperEncoder`, mean
  over all 1500 output frames (as `WhisperForAudioClassification`); HuBERT / wav2vec2:
  `Wav2Vec2FeatureExtractor` (normalised, padded to the longest item of the batch) +
  `HubertModel` / `Wav2Vec2Model` without attention mask (as HF does for the base
  models), mean over frames. `torch.nn.Linear` head, `torch.optim.AdamW`.

Printed per side: wall time per epoch, utterances/s, audio-seconds/s, the share of the
computed input frames that were padding, and the ratio PyTorch time / jaxser time. The
last line is one JSON object.

The default corpus is the built-in synthetic one (`generate_corpus`, 1-12 s, mean
3.6 s), written and prepared once under `--work-dir`; `--corpus DIR` takes any prepared
data set (its `train` split).

    .venv/bin/python bench/epoch.py --model whisper-base --utterances 500
    .venv/bin/python bench/epoch.py --model hubert-base --utterances 128 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from jaxser import hugepages  # noqa: E402

WHISPER_SAMPLES = 480_000  # 30 s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="whisper-base", help="whisper-base, hubert-base, ...")
    p.add_argument("--corpus", default="", help="a prepared data set (default: synthetic)")
    p.add_argument("--utterances", type=int, default=500,
                   help="size of the synthetic corpus (ignored with --corpus)")
    p.add_argument("--split", default="train", help="split of the prepared data set")
    p.add_argument("--batch", type=int, default=16, help="global batch in utterances")
    p.add_argument("--epochs", type=int, default=2, help="epochs per framework")
    p.add_argument("--torch-epochs", type=int, default=None,
                   help="PyTorch epochs if fewer than --epochs (it compiles nothing, so its "
                        "first epoch is its steady state; saves time on slow machines)")
    p.add_argument("--buckets", type=int, default=4, help="jaxser's number of length buckets")
    p.add_argument("--workers", type=int, default=2, help="PyTorch DataLoader workers")
    p.add_argument("--work-dir", default="/tmp/jaxser_bench_epoch",
                   help="where the synthetic corpus is written and prepared (kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="run jaxser only")
    p.add_argument("--no-jaxser", action="store_true", help="run PyTorch only")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this many seconds for a 1-min load below --quiet-load")
    p.add_argument("--quiet-load", type=float, default=2.5)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- corpus


def synthetic_corpus(work_dir: Path, utterances: int, seed: int) -> Path:
    """Writes (once) and prepares the synthetic corpus; returns the prepared directory."""
    from jaxser.data import prepare, synthetic

    speakers = max(1, round(utterances / 20))
    per_speaker = math.ceil(utterances / speakers)
    root = work_dir / f"synthetic_{speakers}x{per_speaker}_seed{seed}"
    prepared = root / "prepared"
    if (prepared / "dataset.json").exists():
        return prepared
    print(f"writing the synthetic corpus ({speakers} speakers x {per_speaker}) to {root}",
          flush=True)
    manifest = synthetic.generate_corpus(
            root / "corpus", num_speakers=speakers, utterances_per_speaker=per_speaker,
            seed=seed, mean_seconds=3.6, min_seconds=1.0, max_seconds=12.0)
    prepare.prepare([manifest], prepared, split="speaker:100/0/0", seed=seed, workers=2,
                    progress=False)
    return prepared


def split_lengths(data_dir: Path, split: str) -> np.ndarray:
    from jaxser.data import records

    return np.asarray(records.load_index(data_dir, split).length, np.int64)


# ----------------------------------------------------------------------------- jaxser


class JaxserEpochs:
    """The trainer's own objects: Experiment, sharded state, jitted step, bucketed pipeline."""

    def __init__(self, args, data_dir: Path, info: dict):
        from jaxser.config import base_config
        from jaxser.data import pipeline
        from jaxser.train.experiment import Experiment

        cfg = base_config()
        cfg.data.dir = str(data_dir)
        cfg.data.train_split = args.split
        cfg.data.global_batch = args.batch
        cfg.data.num_buckets = args.buckets
        cfg.seed = args.seed
        model_cfg = common.jaxser_model_config(args.model)
        for key in ("encoder", "size", "dtype", "remat", "attention", "pooling"):
            cfg.model[key] = model_cfg[key]
        for key, value in model_cfg.encoder_overrides.items():
            cfg.model.encoder_overrides[key] = value
        cfg.optim.name, cfg.optim.lr = "adamw", common.LR
        cfg.optim.weight_decay = common.WEIGHT_DECAY
        cfg.loss.kl, cfg.loss.cosine = 1.0, 0.0
        self.exp = Experiment(cfg, info["labels"], info.get("corpora") or ["corpus"])
        with self.exp.mesh_context():
            self.state, shardings = self.exp.init_state(jax.random.key(args.seed))
            self.step = self.exp.train_step(shardings)
        self.iterator = pipeline.train_iterator(data_dir, args.split, self.exp.pipe_cfg)
        self.key = jax.random.key(args.seed + 1)
        self.steps = self.iterator.steps_per_epoch
        self.buckets = self.iterator.buckets

    def epoch(self, counter: common.CompileCounter) -> dict:
        """One epoch; wall time, audio, padding and compilations."""
        utts = samples = area = 0
        compiles0 = counter.count
        t0 = time.perf_counter()
        with self.exp.mesh_context(), counter:
            for _ in range(self.steps):
                batch = next(self.iterator)
                valid = batch["valid"] > 0
                utts += int(valid.sum())
                samples += int(batch["length"][valid].sum())
                area += int(batch["audio"].size)
                self.state, metrics = self.step(self.state, self.exp.device_batch(batch),
                                                self.key)
            loss = float(metrics["loss"])  # waits for the last step
        return {"seconds": time.perf_counter() - t0, "utterances": utts,
                "audio_seconds": samples / common.SAMPLE_RATE,
                "padding_fraction": 1.0 - samples / area, "steps": self.steps,
                "compiles": counter.count - compiles0, "last_loss": loss}


# ----------------------------------------------------------------------------- torch


class ShardDataset:
    """A map-style torch dataset over the records of a prepared split (audio, label).

    Reads each record with one `os.pread` (the file descriptors are opened lazily in each
    DataLoader worker) and parses the tf.train.Example.
    """

    def __init__(self, data_dir: Path, split: str):
        from jaxser.data import records

        index = records.load_index(data_dir, split)
        self.paths = [os.path.join(data_dir, f) for f in index.files]
        self.shard, self.offset = np.asarray(index.shard), np.asarray(index.offset)
        self.nbytes = np.asarray(index.nbytes)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    def __getitem__(self, i: int):
        import tensorflow as tf

        s = int(self.shard[i])
        if s not in self._fds:
            self._fds[s] = os.open(self.paths[s], os.O_RDONLY)
        payload = os.pread(self._fds[s], int(self.nbytes[i]), int(self.offset[i]))
        feature = tf.train.Example.FromString(payload).features.feature
        audio = np.frombuffer(feature["audio"].bytes_list.value[0], np.int16)
        audio = audio.astype(np.float32) / 32768.0
        label = np.asarray(feature["label"].float_list.value, np.float32)
        return audio, label


class Collate:
    """Feature extraction of a list of (audio, label) in the DataLoader workers.

    Returns (inputs, targets, valid samples, padded samples) of the batch.
    """

    def __init__(self, family: str, num_mel: int):
        import transformers

        self.family = family
        if family == "whisper":
            self.fe = transformers.WhisperFeatureExtractor(feature_size=num_mel)
        else:
            self.fe = transformers.Wav2Vec2FeatureExtractor(
                    feature_size=1, sampling_rate=common.SAMPLE_RATE, padding_value=0.0,
                    do_normalize=True, return_attention_mask=False)

    def __call__(self, items):
        import torch

        audios = [a for a, _ in items]
        targets = torch.from_numpy(np.stack([t for _, t in items]))
        valid = sum(a.size for a in audios)
        if self.family == "whisper":
            out = self.fe(audios, sampling_rate=common.SAMPLE_RATE, return_tensors="pt")
            inputs = out["input_features"]  # [B, num_mel, 3000]: 30 s each
            area = len(audios) * WHISPER_SAMPLES
        else:
            out = self.fe(audios, sampling_rate=common.SAMPLE_RATE, padding="longest",
                          return_tensors="pt")
            inputs = out["input_values"]  # [B, longest]
            area = int(inputs.numel())
        return inputs, targets, valid, area


class TorchEpochs:
    """transformers encoder + head + AdamW fed by a DataLoader with workers."""

    def __init__(self, args, data_dir: Path, enc_cfg, num_classes: int):
        import torch

        family = common.family_of(args.model)
        torch.manual_seed(args.seed)
        self.module = common.torch_ser_model(args.model, enc_cfg,
                                             num_classes=num_classes).train()
        self.opt = common.torch_optimizer(self.module)
        self.step = common.torch_train_step(self.module, self.opt)
        generator = torch.Generator()
        generator.manual_seed(args.seed)
        self.loader = torch.utils.data.DataLoader(
                ShardDataset(data_dir, args.split), batch_size=args.batch, shuffle=True,
                num_workers=args.workers,
                collate_fn=Collate(family, getattr(enc_cfg, "num_mel_bins", 80)),
                generator=generator)

    def epoch(self) -> dict:
        utts = samples = area = steps = 0
        t0 = time.perf_counter()
        for inputs, targets, valid, padded in self.loader:
            loss = self.step(inputs, targets)
            utts += int(targets.shape[0])
            samples += valid
            area += padded
            steps += 1
        return {"seconds": time.perf_counter() - t0, "utterances": utts,
                "audio_seconds": samples / common.SAMPLE_RATE,
                "padding_fraction": 1.0 - samples / area, "steps": steps,
                "last_loss": float(loss.detach())}


# ----------------------------------------------------------------------------- main


def _report(name: str, i: int, r: dict) -> None:
    print(f"{name:7s} epoch {i + 1}: {r['seconds']:.1f} s, {r['steps']} steps, "
          f"{r['utterances'] / r['seconds']:.2f} utt/s, "
          f"{r['audio_seconds'] / r['seconds']:.1f} audio-s/s, "
          f"padding {100 * r['padding_fraction']:.1f}% of computed frames"
          + (f", {r['compiles']} compilations" if "compiles" in r else "")
          + f", peak RSS {r['peak_rss_gib']:.1f} GiB, load {common.load_average()}", flush=True)


def _serve(args, data_dir: Path, info: dict, conn) -> None:
    """jaxser's child process: builds the trainer's objects, then runs an epoch per request.

    jaxser runs in a process of its own so that its memory and PyTorch's (and the fork of
    PyTorch's DataLoader workers) never meet: HuBERT at batch 16 needs both peaks apart on
    a 24 GiB machine. PyTorch stays in the main process, where its DataLoader is as fast
    as in a plain training script.
    """
    import resource

    try:
        t0 = time.perf_counter()
        runner = JaxserEpochs(args, data_dir, info)
        counter = common.CompileCounter()
        conn.send({"steps": runner.steps, "buckets": runner.buckets,
                   "setup_s": time.perf_counter() - t0, "enc_cfg": runner.exp.enc_cfg})
        while conn.recv() == "epoch":
            r = runner.epoch(counter)
            r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            conn.send(r)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


class JaxserChild:
    """The parent's handle on jaxser's child process."""

    def __init__(self, args, data_dir: Path, info: dict):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(args, data_dir, info, child),
                                name="bench-jaxser")
        # jaxser as `jaxser train` runs it: with huge-page malloc (jaxser.hugepages); the
        # PyTorch side (this process) keeps the default malloc, which suits it better.
        with hugepages.for_children():
            self.proc.start()
        self.setup = self._receive()

    def _receive(self) -> dict:
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"jaxser process failed: {msg['error']}")
        return msg

    def epoch(self) -> dict:
        self.conn.send("epoch")
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(timeout=60)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxser.data import shards

    data_dir = Path(args.corpus) if args.corpus else synthetic_corpus(
            Path(args.work_dir), args.utterances, args.seed)
    info = shards.load_dataset_info(data_dir)
    lengths = split_lengths(data_dir, args.split)
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:.0f} s for load < {args.quiet_load}: "
              f"{common.wait_for_quiet(args.wait_quiet, args.quiet_load)}", flush=True)
    machine = common.machine()
    print(f"machine: {machine['summary']}; {machine}", flush=True)
    seconds = lengths / common.SAMPLE_RATE
    print(f"corpus {data_dir} split {args.split}: {lengths.size} utterances, "
          f"{seconds.sum():.0f} s of audio (mean {seconds.mean():.2f} s, "
          f"min {seconds.min():.2f}, max {seconds.max():.2f}); {args.model}, global batch "
          f"{args.batch}, {args.epochs} epochs each", flush=True)

    import resource

    jx = tc = None
    runs: dict[str, list[dict]] = {"jaxser": [], "torch": []}
    try:
        if not args.no_jaxser:
            jx = JaxserChild(args, data_dir, info)
            print(f"jaxser: setup {jx.setup['setup_s']:.1f} s (child process); "
                  f"{jx.setup['steps']} steps per epoch; buckets (samples, batch): "
                  f"{jx.setup['buckets']}", flush=True)
            enc_cfg = jx.setup["enc_cfg"]
        else:
            enc_cfg = common.build_jaxser(args.model)[1]
        if not args.no_torch:
            t0 = time.perf_counter()
            tc = TorchEpochs(args, data_dir, enc_cfg, len(info["labels"]))
            print(f"torch: setup {time.perf_counter() - t0:.1f} s", flush=True)
        torch_epochs = args.epochs if args.torch_epochs is None else args.torch_epochs
        for i in range(args.epochs):
            for name, side in (("jaxser", jx), ("torch", tc)):
                if side is None or (name == "torch" and i >= torch_epochs):
                    continue
                r = side.epoch()
                if name == "torch":
                    r["peak_rss_gib"] = resource.getrusage(
                            resource.RUSAGE_SELF).ru_maxrss / 2**20
                runs[name].append(r)
                _report(name, i, r)
    finally:
        if jx is not None:
            jx.close()

    result: dict = {"model": args.model, "utterances": int(lengths.size),
                    "audio_seconds": round(float(seconds.sum()), 1), "batch": args.batch,
                    "device": f"{machine['jax_device']} ({machine['cpu']}, "
                              f"{machine['cores']} cores)", "machine": machine,
                    "load_average_end":
                    common.load_average()}
    for name in ("jaxser", "torch"):
        r = runs[name]
        result[f"{name}_epoch_s"] = round(r[0]["seconds"], 2) if r else None
        result[f"{name}_epoch2_s"] = round(r[1]["seconds"], 2) if len(r) > 1 else None
        result[f"{name}_padding_fraction"] = round(r[0]["padding_fraction"], 4) if r else None
        if r:
            last = r[-1]
            result[f"{name}_utterances_per_s"] = round(last["utterances"] / last["seconds"], 3)
            result[f"{name}_audio_s_per_s"] = round(last["audio_seconds"] / last["seconds"], 2)
            result[f"{name}_peak_rss_gib"] = round(max(x["peak_rss_gib"] for x in r), 2)
    if runs["jaxser"]:
        result["jaxser_compiles"] = [r["compiles"] for r in runs["jaxser"]]
    ratio = ratio2 = None
    if runs["jaxser"] and runs["torch"]:
        ratio = result["torch_epoch_s"] / result["jaxser_epoch_s"]
        print(f"epoch 1 (jaxser incl. compilation): PyTorch / jaxser time = {ratio:.2f}x")
        torch_steady = result["torch_epoch2_s"] or result["torch_epoch_s"]
        if result["jaxser_epoch2_s"]:
            ratio2 = torch_steady / result["jaxser_epoch2_s"]
            which = "2" if result["torch_epoch2_s"] else "1 (its only one)"
            print(f"jaxser epoch 2 (steady state) against PyTorch epoch {which}: "
                  f"PyTorch / jaxser time = {ratio2:.2f}x")
    result["epoch_ratio"] = None if ratio is None else round(ratio, 3)
    result["epoch2_ratio"] = None if ratio2 is None else round(ratio2, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
