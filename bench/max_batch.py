"""Largest train-step batch that fits in memory: jaxser and PyTorch, remat off and on.

For each framework and rematerialisation setting, child processes run the train step of
bench/train_step.py (same model, head, AdamW, precision) on a batch of `--seconds`
utterances: one warm-up step and one more, then report their peak resident memory. The
largest batch whose peak stays within `--memory-gib` is found with few probes: after
batches 1 and 2, the next probe is the batch that a straight line through the two
measurements nearest the budget predicts (memory is close to linear in the batch), and
the search stops when it has a batch that fits next to one that does not. A probe killed
for memory counts as not fitting. jaxser's probes run with huge-page malloc, as
`jaxser train` runs (jaxser.hugepages); PyTorch's with the environment as given.
jaxser's remat is a scan over the layers under `jax.checkpoint` (jaxser.models.layers);
PyTorch's is transformers' gradient checkpointing (non-reentrant).

    .venv/bin/python bench/max_batch.py --model whisper-base --seconds 30 --memory-gib 16

Prints every probe (batch, peak RSS, seconds per step) and ends with one JSON line:
`model`, `seconds`, `dtype`, `memory_gib`, `device`, `max_batch` ({framework: {"off": B,
"on": B}}), `gib_per_utterance` (slope of the fit at the end), `probes`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from jaxser import hugepages  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="whisper-base", help="preset, as in train_step.py")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per utterance")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="auto", help="jaxser attention implementation")
    p.add_argument("--memory-gib", type=float, default=0.0,
                   help="peak resident memory allowed (default: 90%% of RAM)")
    p.add_argument("--max-batch", type=int, default=512, help="largest batch tried")
    p.add_argument("--frameworks", default="jaxser,torch", help="comma-separated")
    p.add_argument("--probe", choices=("jaxser", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def probe(args) -> None:
    """Child process: a warm-up and one more train step; prints peak RSS and step time."""
    from bench import train_step

    batch, enc_cfg = train_step.make_batch(args)
    if args.probe == "jaxser":
        runner = train_step.JaxserRunner(args, batch, common.CompileCounter())
    else:
        runner = train_step.TorchRunner(args, batch, enc_cfg)
    runner.step()
    step_s = runner.step()
    print(json.dumps({"peak_rss_gib": train_step.peak_rss_gib(), "step_s": step_s}))


def run_probe(args, framework: str, batch: int, remat: bool) -> dict:
    """One child process; `peak_rss_gib` is None when it failed (killed for memory)."""
    cmd = [sys.executable, __file__, "--probe", framework, "--batch", str(batch),
           "--model", args.model, "--seconds", str(args.seconds), "--dtype", args.dtype,
           "--attention", args.attention] + (["--remat"] if remat else [])
    t0 = time.perf_counter()
    with hugepages.for_children() if framework == "jaxser" else contextlib.nullcontext():
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = {"framework": framework, "remat": remat, "batch": batch, "peak_rss_gib": None,
           "step_s": None, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode == 0:
        out.update({k: round(v, 3) for k, v in
                    json.loads(proc.stdout.strip().splitlines()[-1]).items()})
    else:
        out["error"] = f"exit code {proc.returncode}: {proc.stderr.strip()[-300:]}"
    peak = "failed" if out["peak_rss_gib"] is None else f"{out['peak_rss_gib']:.2f} GiB"
    print(f"  {framework} remat={'on' if remat else 'off'} batch {batch}: peak RSS {peak}, "
          f"step {out['step_s']} s, probe {out['wall_s']} s", flush=True)
    return out


def predict(points: dict[int, float], budget: float) -> tuple[int | None, float | None]:
    """Batch at which the line through the two measurements nearest the budget hits it."""
    if len(points) < 2:
        return None, None
    (b0, m0), (b1, m1) = sorted(sorted(points.items(), key=lambda p: abs(p[1] - budget))[:2])
    slope = (m1 - m0) / (b1 - b0)
    if slope <= 0:
        return None, None
    return int(b0 + (budget - m0) / slope), slope


def search(args, framework: str, remat: bool, budget: float,
           probes: list[dict]) -> tuple[int, float | None]:
    """Largest batch <= --max-batch with peak RSS <= budget (0 if batch 1 does not fit)."""
    good, bad = 0, args.max_batch + 1
    points: dict[int, float] = {}
    batch, slope = 1, None
    while bad - good > 1:
        result = run_probe(args, framework, batch, remat)
        probes.append(result)
        peak = result["peak_rss_gib"]
        if peak is not None:
            points[batch] = peak
        if peak is not None and peak <= budget:
            good = batch
        else:
            bad = batch
        guess, slope = predict(points, budget)
        if guess is None:
            guess = 2 * good if good else 1
        if guess <= good:  # the line says `good` is the answer: check the next batch
            guess = good + 1
        batch = guess if guess < bad else (good + bad) // 2
    return good, slope


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        probe(args)
        return {}
    budget = args.memory_gib or 0.9 * os.sysconf("SC_PHYS_PAGES") * os.sysconf(
            "SC_PAGE_SIZE") / 2**30
    info = common.machine()
    print(f"machine: {info['summary']}; {info}", flush=True)
    print(f"{args.model} {args.dtype}, {args.seconds:g} s utterances, "
          f"budget {budget:.1f} GiB peak RSS", flush=True)
    probes: list[dict] = []
    max_batch: dict[str, dict[str, int]] = {}
    per_utt: dict[str, dict[str, float | None]] = {}
    for framework in args.frameworks.split(","):
        for remat in (False, True):
            good, slope = search(args, framework, remat, budget, probes)
            key = "on" if remat else "off"
            max_batch.setdefault(framework, {})[key] = good
            per_utt.setdefault(framework, {})[key] = None if slope is None else round(slope, 3)
            print(f"{framework} remat={key}: largest batch {good}"
                  + ("" if good <= args.max_batch - 1 else " (the cap: --max-batch)"),
                  flush=True)
    result = {"model": args.model, "seconds": args.seconds, "dtype": args.dtype,
              "memory_gib": round(budget, 2),
              "device": f"{info['jax_device']} ({info['cpu']}, {info['cores']} cores)",
              "machine": info, "max_batch": max_batch, "gib_per_utterance": per_utt,
              "probes": probes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
