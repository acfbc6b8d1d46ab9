"""The SUPERB / EmoBox probing protocol: a frozen upstream encoder, its hidden states cached
once (`jaxser extract`), and a small downstream head trained on them in seconds.

Downstream (SUPERB emotion, EmoBox): linear -> 256 -> ReLU -> masked mean over the frames ->
linear, on the learned softmax-weighted sum of all hidden states; Adam at 1e-4, batch 32,
cross-entropy, the best epoch by validation UA, WA / UA / macro-F1 on fixed folds. In jaxser
terms that head is `pooling=frame_logits` with `head_hidden=256`: each frame goes through
dense(256) -> ReLU -> dense(K) and the utterance logits are the masked mean of the frame
logits, which equals dense(K) of the masked mean of the ReLU features (the last layer is
linear), so it needs the frame features of every layer (`extract.frame_layers=all`).

    jaxser prepare --manifest iemocap.csv --taxonomy iemocap4 \
        --split 'logo:session=Ses01' --out data/iemocap4/fold0        # (or let --folds do it)
    jaxser train --config configs/superb_probe.py --folds 5 --manifest iemocap.csv \
        --taxonomy iemocap4 --split-format 'logo:session=Ses0{fold1}'
    jaxser sweep --config configs/superb_probe.py:layer --folds 5 ...  # one row per layer

The folds share one feature folder: the encoder runs once over the corpus.

Variants (`--config configs/superb_probe.py:VARIANT`):
  ""         weighted sum of all layers, the downstream above, on frame features
  layer      one hidden state (the last; `--config.data.feature_layers='(6,)'` picks
             another; `jaxser sweep` runs them all)
  pooled     the fast linear probe: a linear head on the masked mean of each layer
             (weighted sum), no frame features cached (a folder a few MB in size)
  smoke      a tiny random Whisper-style encoder; extracts and trains in seconds on CPU
"""

from jaxser.config import base_config
from jaxser.configs import common

VARIANTS = ("", "layer", "pooled", "smoke")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/superb_probe.py: "
                         f"{', '.join(v for v in VARIANTS if v)}")
    c = base_config()
    c.workdir = f"runs/superb_probe/{variant or 'weighted'}"  # Checkpoints, logs, reports.
    c.data.dir = "data/iemocap4/fold0"  # A prepared dataset (fold i: --folds sets it).
    c.data.features = "features/superb_probe/hubert_large"  # One extraction for all folds.
    c.data.global_batch = 32  # Utterances per step, as SUPERB and EmoBox.
    c.data.eval_batch = 32  # Utterances per evaluation batch.
    c.data.num_buckets = 4  # Length buckets of the frame features (a few compiled shapes).

    c.model.encoder = "hubert"  # The upstream (whisper, wavlm, wav2vec2, ... likewise).
    c.model.size = "hubert-large"  # Architecture preset (the checkpoint's config wins).
    c.model.pretrained = "checkpoints/hubert-large-ll60k"  # Local HF folder, frozen.
    c.model.layer_weighted_sum = True  # Learned softmax weights over all hidden states.
    c.model.pooling = "frame_logits"  # Per-frame head, logits averaged over valid frames...
    c.model.head_hidden = 256  # ... through dense(256) -> ReLU: SUPERB's downstream.
    c.model.dropout = 0.0  # No dropout.

    c.loss.kl = 0.0  # Not the label-distribution loss...
    c.loss.soft_ce = 1.0  # ... cross-entropy (on one-hot targets, the usual CE).

    c.optim.name = "adam"  # Adam, as SUPERB and EmoBox.
    c.optim.lr = 1e-4  # Constant rate.
    c.optim.schedule = "constant"  # No decay, no warmup.
    c.optim.freeze = ("encoder/*",)  # The upstream is frozen (its features are cached).

    c.train.epochs = 20  # Passes over the training split.
    c.train.best_metric = "ua"  # Highest validation UA picks the best epoch.
    c.train.best_tiebreak = "wa"  # Ties go to the higher WA.
    c.train.log_every = 20  # Steps between logged training metrics.

    c.extract.frame_layers = "all"  # The frame features of every hidden state (float16).
    c.extract.stats = "mean"  # Pooled: the masked mean of each hidden state.

    if variant == "layer":
        c.model.layer_weighted_sum = False  # One hidden state...
        c.data.feature_layers = (-1,)  # ... the last one (`jaxser sweep` sets each).
    elif variant == "pooled":
        c.data.features = "features/superb_probe/hubert_large_pooled"  # No frames kept.
        c.extract.frame_layers = ""  # Pooled statistics only.
        c.model.pooling = "mean"  # The mean over frames, cached.
        c.model.head_hidden = 0  # A linear head.
    elif variant == "smoke":
        c.model.encoder = "whisper"  # The tiny random Whisper-style encoder...
        common.smoke(c, "superb_probe")  # ... CPU-sized batches, one epoch.
        c.data.features = "runs/superb_probe/smoke/features"
        c.data.num_buckets = 1  # One compiled shape.
        c.optim.lr = 1e-3  # A tiny random head takes a large rate.
    return c
