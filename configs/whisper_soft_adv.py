"""Generalizable SER with soft labels (arXiv 2311.08607): Whisper on many harmonised corpora.

A Whisper encoder with its conv stem frozen; corpora harmonised into one taxonomy as soft
labels with neutral smoothing (prepare flags); per-frame logits averaged over the valid frames;
soft-target cross-entropy; a domain-adversarial head on the corpus id behind a gradient-reversal
layer (weight 0.01); the seven waveform augmentations at p=0.2 plus SpecAugment; model
selection by validation micro-F1 (`jaxser evaluate` also reports UA).

Variants (`--config configs/whisper_soft_adv.py:VARIANT`):
  ""             all corpora, speaker-independent 80/10/10 (data/soft)
  loco=CORPUS    zero-shot: CORPUS held out as the test split (data/soft_loco_CORPUS,
                 prepared with `--split loco:CORPUS`)
  smoke          a tiny random Whisper that trains in seconds on CPU (tests)
"""

from jaxser.config import base_config
from jaxser.configs import common

# `jaxser prepare --taxonomy`: the common label set. basic8 is basic without contempt;
# contempt is harmonised as the paper does, disgust 0.5, the other half neutral (a target
# sums to 1; see jaxser/data/maps/common_to_basic8.json).
TAXONOMY = "basic8"
NEUTRAL_SMOOTHING = 0.1  # `jaxser prepare --neutral-smoothing`: neutral mixed into targets.


def prepare_command(manifests: tuple[str, ...] = ("ravdess.csv", "cremad.csv", "emodb.csv"),
                    loco: str = "") -> str:
    """The `jaxser prepare` command that builds the folder a variant reads."""
    out, split = (f"data/soft_loco_{loco}", f"loco:{loco}") if loco else \
        ("data/soft", "speaker:80/10/10")
    flags = " ".join(f"--manifest {m}" for m in manifests)
    return (f"jaxser prepare {flags} --out {out} --taxonomy {TAXONOMY} "
            f"--neutral-smoothing {NEUTRAL_SMOOTHING} --split {split}")


def get_config(variant: str = ""):
    c = base_config()
    c.workdir = "runs/whisper_soft_adv"  # Checkpoints, logs and eval reports.
    c.data.dir = "data/soft"  # Prepared by prepare_command() (see docs/methods.md).
    c.data.global_batch = 32  # Utterances per step.
    c.data.eval_batch = 32  # Utterances per evaluation batch.
    c.data.max_seconds = 30.0  # Whisper's window: longer training clips are cropped at random.
    c.data.num_buckets = 4  # Length buckets (Whisper runs on variable-length input here).

    c.model.encoder = "whisper"  # Whisper encoder on log-mel features.
    c.model.size = "whisper-small"  # Architecture preset (the checkpoint's config wins).
    c.model.pretrained = "checkpoints/whisper-small"  # Local HF folder (config + weights).
    c.model.pooling = "frame_logits"  # Head on every frame, logits averaged over valid frames.
    c.model.head_hidden = 0  # Linear per-frame head.
    c.model.dropout = 0.1  # Dropout on the frames before the head.
    c.model.domain_head = True  # Corpus classifier behind a gradient-reversal layer.
    c.model.domain_hidden = 256  # Hidden width of the domain classifier.

    c.loss.kl = 0.0  # No KL term.
    c.loss.soft_ce = 1.0  # Cross-entropy against the soft (harmonised, smoothed) targets.
    c.loss.domain = 0.01  # Gradient-reversal weight of the domain loss.
    c.loss.domain_schedule = "constant"  # Fixed reversal weight.

    c.augment.waveform = True  # Polarity, gain, reversal, noise, resampling, EQ, echo.
    c.augment.p = 0.2  # Probability of each waveform transform per example.
    c.augment.specaugment = True  # Time and frequency masks on the log-mel features.
    c.augment.time_masks = 2  # SpecAugment: time masks per example.
    c.augment.time_mask_width = 20  # SpecAugment: widest time mask (10 ms frames).
    c.augment.freq_masks = 2  # SpecAugment: frequency masks per example.
    c.augment.freq_mask_width = 10  # SpecAugment: widest frequency mask (mel bins).

    c.optim.name = "adamw"  # AdamW.
    c.optim.lr = 1e-5  # Fine-tuning rate of a pretrained Whisper encoder.
    c.optim.weight_decay = 0.01  # Light decoupled weight decay.
    c.optim.schedule = "cosine"  # Cosine decay after warmup.
    c.optim.warmup_steps = 500  # Linear warmup.
    c.optim.clip_norm = 1.0  # Global gradient clipping.
    c.optim.freeze = ("encoder/conv*",)  # The conv stem (conv1, conv2) stays frozen.

    c.train.epochs = 10  # Passes over the training split.
    c.train.eval_every = 0  # Validation once per epoch.
    c.train.best_metric = "micro_f1"  # Highest validation micro-F1 picks the best checkpoint.
    c.train.keep_best = 1  # Best checkpoints kept.
    c.train.log_every = 50  # Steps between logged training metrics.

    if variant.startswith("loco="):
        corpus = variant.split("=", 1)[1]
        if not corpus:
            raise ValueError("variant loco=CORPUS needs a corpus name")
        c.workdir = f"runs/whisper_soft_adv/loco_{corpus}"
        c.data.dir = f"data/soft_loco_{corpus}"
    elif variant == "smoke":
        common.smoke(c, "whisper_soft_adv")
        c.model.domain_hidden = 16  # Tiny domain classifier.
        c.augment.p = 0.5  # More transforms fire in a few steps.
        c.optim.warmup_steps = 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/whisper_soft_adv.py: "
                         "loco=CORPUS, smoke")
    return c
