"""Multi-loss learning with energy-adaptive mixup and frame-level attention (arXiv 2512.04551).

An SSL encoder (WavLM-large, as the paper; fine-tuned, or frozen with the `frozen` variant;
HuBERT or wav2vec2 through `--config.model.encoder`/`size`/`pretrained`), a frame-level
attention module (16-head self-attention with a residual, then attention pooling with a
learned query), energy-adaptive mixup (a segment of another utterance mixed in at a random
SNR, the soft label from each source's energy), and the loss KL + focal + center +
supervised contrastive. Adam at 1e-4 decayed by 7/8 per epoch, centers at 5e-3, batch 16,
20 epochs. WA/UA are reported over k speaker-independent folds (`jaxser.folds`):

    jaxser train --config configs/mll_eam_flam.py --folds 5 \
        --manifest iemocap.csv --taxonomy iemocap4

which prepares data/iemocap4_folds/fold{i} (`kfold:5:i`), trains runs/mll_eam_flam/fold{i}
and writes runs/mll_eam_flam/folds_summary.json (mean and std of every metric).

Variants (`--config configs/mll_eam_flam.py:VARIANT`):
  ""       encoder fine-tuned with the rest
  frozen   encoder frozen (`optim.freeze=("encoder/*",)`): only attention, head and centers train
  smoke    a tiny random WavLM that trains in seconds on CPU (tests)
"""

from jaxser.config import base_config
from jaxser.configs import common


def get_config(variant: str = ""):
    c = base_config()
    c.workdir = "runs/mll_eam_flam"  # Root of the fold workdirs (--folds: <workdir>/fold{i}).
    c.data.dir = "data/iemocap4_folds/fold0"  # One fold; --folds uses its parent as root.
    c.data.global_batch = 16  # Utterances per step, as the paper.
    c.data.eval_batch = 16  # Utterances per evaluation batch.
    c.data.num_buckets = 4  # Length buckets: less padding, a few compiled shapes.

    c.model.encoder = "wavlm"  # WavLM encoder on the raw waveform, as the paper.
    c.model.size = "wavlm-large"  # Architecture preset (the checkpoint's config wins).
    c.model.pretrained = "checkpoints/wavlm-large"  # microsoft/wavlm-large, a local HF folder.
    c.model.pooling = "frame_attention"  # Self-attention + residual, then query pooling.
    c.model.attention_heads = 16  # Heads of the frame-level attention module.
    c.model.head_hidden = 0  # Linear emotion head on the pooled embedding.
    c.model.dropout = 0.1  # Dropout before the head.

    c.augment.mixup = "energy"  # Energy-adaptive mixup (soft labels from source energies).
    c.augment.mixup_p = 1.0  # Every training example is mixed.

    c.loss.kl = 1.0  # KL(mixed target || prediction).
    c.loss.focal = 1.0  # Focal loss on the soft targets.
    c.loss.focal_gamma = 2.0  # Focal loss focusing parameter.
    c.loss.center = 0.01  # Center loss on the pooled embeddings.
    c.loss.supcon = 0.1  # Supervised contrastive loss on the pooled embeddings.
    c.loss.supcon_temperature = 0.1  # SupCon temperature.

    c.optim.name = "adam"  # Adam.
    c.optim.lr = 1e-4  # Initial learning rate.
    c.optim.schedule = "epoch_decay"  # lr * epoch_decay ** epoch.
    c.optim.epoch_decay = 0.875  # x7/8 per epoch.
    c.optim.center_lr = 5e-3  # SGD rate of the class centers.
    c.optim.freeze = ()  # Nothing frozen: the encoder is fine-tuned.

    c.train.epochs = 20  # Passes over the training split.
    c.train.eval_every = 0  # Validation once per epoch.
    c.train.best_metric = "ua"  # Highest validation UA picks the best checkpoint.
    c.train.keep_best = 1  # Best checkpoints kept.
    c.train.log_every = 20  # Steps between logged training metrics.

    if variant == "frozen":
        c.workdir = "runs/mll_eam_flam_frozen"
        c.optim.freeze = ("encoder/*",)  # The whole SSL encoder stays fixed.
    elif variant == "smoke":
        common.smoke(c, "mll_eam_flam")
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/mll_eam_flam.py: frozen, smoke")
    return c
