"""MSP-Podcast challenge baseline (Odyssey 2024, msplabresearch/MSP-Podcast_Challenge):
categories and emotion dimensions from one fine-tuned SSL encoder.

WavLM-large fine-tuned with its convolutional feature encoder frozen; attentive statistics
pooling; each head one 1024-wide layer with LayerNorm, ReLU and dropout 0.5, then the output
layer; class-weighted cross-entropy (weights N / (K n_k) from the training split) for the
eight categories and 1 - CCC for arousal, valence and dominance (the corpus' 1-7 ratings
rescaled to 0-1 by prepare; reports give them on 1-7); AdamW at 1e-5; batch 32 as 8 x 4
gradient accumulation (the CCC is the batch CCC of each micro-batch of 8, as in the
baseline, see jaxser.train.step); 20 epochs; 12 s random training crops (evaluation on whole
utterances); model selection by validation macro-F1 (categorical), mean CCC (dimensional),
or their mean (`macro_f1_ccc`, this multi-task default). The baseline trains one model per
task; the default variant trains both heads on one encoder (loss weights 1 and 1), the
`categorical` and `dimensional` variants are the baseline's two models.

Data (the release layout: Labels/labels_consensus.csv and Audios/):
  jaxser manifest --corpus msp_podcast --root MSP-PODCAST --out msp_podcast.csv
  jaxser prepare --manifest msp_podcast.csv --out data/msp_podcast --split column:split
(`prepare_command()`): the official split (Train / Development / Test1+Test2 as test; the
release's name stays in the group column msp_split, so reports give Test1 and Test2 apart);
the corpus' own eight classes (rows labelled O or X keep their dimensions and have no
category); unknown speakers are fine with the official split.

Variants (`--config configs/msp_podcast.py:VARIANT`):
  ""            multi-task: categories and dimensions, selection by macro_f1_ccc
  categorical   class-weighted CE only, selection by macro-F1
  dimensional   1 - CCC only, selection by mean CCC
  smoke         a tiny random WavLM that trains in seconds on CPU (tests)
"""

from jaxser.config import base_config
from jaxser.configs import common

ENCODER = "wavlm"  # The baseline's WavLM-large (jaxser.models.wavlm).
SIZE = "wavlm-large"
CHECKPOINT = "checkpoints/wavlm-large"  # A local Hugging Face folder (microsoft/wavlm-large).


def prepare_command(manifest: str = "msp_podcast.csv", out: str = "data/msp_podcast") -> str:
    """The `jaxser prepare` command that builds the folder the variants read."""
    return f"jaxser prepare --manifest {manifest} --out {out} --split column:split"


def get_config(variant: str = ""):
    if variant not in ("", "categorical", "dimensional", "smoke"):
        raise ValueError(f"unknown variant {variant!r} of configs/msp_podcast.py: "
                         "categorical, dimensional, smoke")
    c = base_config()
    c.workdir = f"runs/msp_podcast/{variant or 'multitask'}"  # Checkpoints, logs, reports.
    c.data.dir = "data/msp_podcast"  # Prepared by prepare_command() (official split).
    c.data.global_batch = 32  # Utterances per optimizer step, as the baseline ...
    c.data.eval_batch = 32  # Utterances per evaluation batch.
    c.data.max_seconds = 12.0  # Random 12 s crops in training; whole utterances in evaluation.
    c.data.num_buckets = 4  # Length buckets: less padding, a few compiled shapes.

    c.model.encoder = ENCODER  # WavLM: HuBERT's front end + gated relative position bias.
    c.model.size = SIZE  # Architecture preset (the checkpoint's config wins).
    c.model.pretrained = CHECKPOINT  # Fine-tuned from the released weights.
    c.model.pooling = "attentive_stats"  # Attention-weighted mean and standard deviation.
    c.model.dropout = 0.0  # No dropout on the pooled vector itself ...
    c.model.head_hidden = 1024  # ... each head: Linear(1024) ...
    c.model.head_norm = True  # ... LayerNorm ...
    c.model.head_dropout = 0.5  # ... ReLU, Dropout(0.5), then the output layer.
    c.model.dims_head = True  # Arousal/valence/dominance head beside the emotion head.
    c.model.dims_hidden = 1024  # The same one-hidden-layer shape.
    c.model.dims_activation = "none"  # Linear output, as the baseline.

    c.loss.kl = 0.0  # No distribution loss: categories are one-hot here.
    c.loss.weighted_ce = 1.0  # Class-weighted CE, weights N / (K n_k) of the training split.
    c.loss.ccc = 1.0  # 1 - CCC, the mean over arousal, valence and dominance.
    c.loss.dim_weights.arousal = 1.0  # Equal weight per dimension.
    c.loss.dim_weights.valence = 1.0
    c.loss.dim_weights.dominance = 1.0

    c.optim.name = "adamw"  # AdamW ...
    c.optim.lr = 1e-5  # ... at 1e-5 ...
    c.optim.weight_decay = 0.01  # ... with PyTorch's default AdamW weight decay.
    c.optim.schedule = "constant"  # No schedule.
    c.optim.grad_accum = 4  # 32 = 4 micro-batches of 8.
    c.optim.freeze = ("encoder/feature_extractor/*",)  # The conv feature encoder stays frozen.

    c.train.epochs = 20  # Passes over the training split.
    c.train.eval_every = 0  # Validation once per epoch.
    c.train.best_metric = "macro_f1_ccc"  # Mean of validation macro-F1 and mean CCC.
    c.train.keep_best = 1  # Only the best checkpoint is kept.
    c.train.log_every = 50  # Steps between logged training metrics.

    if variant == "categorical":
        c.model.dims_head = False  # Categories only.
        c.loss.ccc = 0.0
        c.train.best_metric = "macro_f1"  # Highest validation macro-F1.
    elif variant == "dimensional":
        c.loss.weighted_ce = 0.0  # Dimensions only (the emotion head is left untrained).
        c.train.best_metric = "ccc_mean"  # Highest validation mean CCC.
    elif variant == "smoke":
        common.smoke(c, "msp_podcast")
        c.data.max_seconds = 2.0  # Short crops of the tiny corpus.
        c.model.head_hidden = 16  # Tiny heads of the same shape.
        c.model.dims_hidden = 16
        c.optim.grad_accum = 2  # Accumulation on: 8 = 2 x 4.
    return c
