"""Cost of the on-device augmentation: waveform suite (all p=1 and default p=0.2) + SpecAugment.

Times each jitted function on one synthetic batch (median of --runs calls after a compile
call) and prints ms per batch, ms per second of audio and, with --step-ms, the fraction of a
reference train step. The last line is one JSON object. With --per-transform, `only_X` is
the suite with only X at p=1 and the rest at p=0 (XLA compiles p=0 transforms away).

    .venv/bin/python bench/augment_cost.py --batch 8 --seconds 4 --runs 10 [--step-ms 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from jaxser.audio import augment as aug  # noqa: E402


def _time(fn, args, runs: int) -> float:
    """Median wall time in ms of fn(key_k, *args) over `runs` calls (after one compile call)."""
    jax.block_until_ready(fn(jax.random.key(0), *args))
    times = []
    for k in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(k + 1), *args))
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="examples per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="buffer length in seconds")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per function")
    parser.add_argument("--mel-bins", type=int, default=80, help="SpecAugment feature bins")
    parser.add_argument("--frame-rate", type=int, default=100, help="feature frames per second")
    parser.add_argument("--speed-method", default="linear", choices=["linear", "sinc"])
    parser.add_argument("--step-ms", type=float, default=None,
                        help="reference train step time in ms to compare against")
    parser.add_argument("--per-transform", action="store_true",
                        help="also time each waveform transform alone (p=1)")
    args = parser.parse_args(argv)

    b, n = args.batch, int(args.seconds * args.sample_rate)
    rng = np.random.default_rng(0)
    audio = jnp.asarray(0.1 * rng.standard_normal((b, n)), jnp.float32)
    lengths = jnp.asarray(rng.integers(n // 2, n + 1, b), jnp.int32)
    audio = jnp.where(jnp.arange(n)[None] < lengths[:, None], audio, 0.0)
    t = int(args.seconds * args.frame_rate)
    feats = jnp.asarray(rng.standard_normal((b, t, args.mel_bins)), jnp.float32)
    frame_mask = jnp.arange(t)[None] < (lengths * t // n)[:, None]

    names = ["polarity_p", "gain_p", "reverse_p", "noise_p", "speed_p", "eq_p", "echo_p"]
    default = aug.WaveformAugmentConfig(sample_rate=args.sample_rate,
                                        speed_method=args.speed_method)
    all_on = dataclasses.replace(default, **{k: 1.0 for k in names})
    cases = {
        "suite_p1": (jax.jit(lambda k, x, n: aug.augment_waveform(k, x, n, all_on)),
                     (audio, lengths)),
        "suite_p0.2": (jax.jit(lambda k, x, n: aug.augment_waveform(k, x, n, default)),
                       (audio, lengths)),
        "spec_augment": (jax.jit(aug.spec_augment), (feats, frame_mask)),
    }
    if args.per_transform:
        for name in names:
            only = dataclasses.replace(default, **{k: float(k == name) for k in names})
            cases[f"only_{name[:-2]}"] = (
                jax.jit(lambda k, x, n, c=only: aug.augment_waveform(k, x, n, c)),
                (audio, lengths))

    audio_s = b * args.seconds
    info = common.machine(with_torch=False)
    print(f"machine: {info['summary']}", flush=True)
    result = {"backend": jax.default_backend(), "machine": info, "batch": b,
              "seconds": args.seconds,
              "speed_method": args.speed_method, "ms": {}, "ms_per_audio_s": {}}
    for name, (fn, fn_args) in cases.items():
        ms = _time(fn, fn_args, args.runs)
        result["ms"][name] = round(ms, 3)
        result["ms_per_audio_s"][name] = round(ms / audio_s, 4)
        line = f"{name:>16}: {ms:9.2f} ms/batch {ms / audio_s:8.3f} ms/audio-s"
        if args.step_ms:
            line += f" {100 * ms / args.step_ms:6.1f}% of a {args.step_ms:g} ms step"
        print(line)
    if args.step_ms:
        total = result["ms"]["suite_p0.2"] + result["ms"]["spec_augment"]
        result["step_ms"] = args.step_ms
        result["fraction_of_step"] = round(total / args.step_ms, 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
