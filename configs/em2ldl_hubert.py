"""EM2LDL baseline (arXiv 2511.20106): an SSL encoder learning 32-class emotion distributions.

HuBERT-large -> masked mean pooling -> linear head -> log-softmax, trained with
KL(target || prediction) + 0.3 * (1 - cosine), Adam at 1e-5, batch 32, 20 epochs; the best
epoch is the one with the lowest validation KL. `jaxser evaluate` reports the six LDL metrics
(KL, cosine, Chebyshev, Clark, Canberra, intersection) overall and per group column.

Variants (`--config configs/em2ldl_hubert.py:VARIANT`), each a speaker-independent evaluation of
the paper, reading its own prepared folder (see EVALUATIONS for the `jaxser prepare` split):
  ""              overall: speakers 70/10/20 (train/validation/test)
  gender_female   train on male speakers, test on female   (logo:gender=female)
  gender_male     train on female speakers, test on male   (logo:gender=male)
  age_youth       test on Youth speakers                   (logo:ageClass=Youth)
  age_nonyouth    test on Non-Youth speakers               (logo:ageClass=Non-Youth)
  mbti_in|mbti_is|mbti_en|mbti_es   leave one personality type out (logo:mbtiDouble=in ...)
                  on the speakers with an MBTI annotation (filter the manifest first)
  smoke           a tiny random HuBERT that trains in seconds on CPU (tests)

The paper compared encoders at base and large size: an encoder from ENCODERS is a variant too,
alone (`:wavlm-large`, the overall split) or after an evaluation (`:gender_female,wavlm-base-plus`;
`:smoke,wavlm-large` is a tiny random one of that family); its runs go to
runs/em2ldl_<encoder>/<evaluation>. Other encoders through fields:
`--config.model.encoder=wav2vec2` (wav2vec2 / XLS-R checkpoints) or
`--config.model.encoder=whisper`, with `--config.model.pretrained=<HF folder>`.
"""

from jaxser.config import base_config
from jaxser.configs import common

# Variant -> (prepare split spec, folder suffix). The data folder is data/em2ldl_<suffix>.
EVALUATIONS = {
    "": ("speaker:70/10/20", "overall"),
    "gender_female": ("logo:gender=female", "gender_female"),
    "gender_male": ("logo:gender=male", "gender_male"),
    "age_youth": ("logo:ageClass=Youth", "age_youth"),
    "age_nonyouth": ("logo:ageClass=Non-Youth", "age_nonyouth"),
    "mbti_in": ("logo:mbtiDouble=in", "mbti_in"),
    "mbti_is": ("logo:mbtiDouble=is", "mbti_is"),
    "mbti_en": ("logo:mbtiDouble=en", "mbti_en"),
    "mbti_es": ("logo:mbtiDouble=es", "mbti_es"),
}


# Encoder variant -> (model.encoder, model.size, model.pretrained: the Hub checkpoint as a
# local folder). The default is HuBERT-large, the paper's main baseline.
ENCODERS = {
    "hubert-large": ("hubert", "hubert-large", "checkpoints/hubert-large-ll60k"),
    "wavlm-base": ("wavlm", "wavlm-base", "checkpoints/wavlm-base"),
    "wavlm-base-plus": ("wavlm", "wavlm-base-plus", "checkpoints/wavlm-base-plus"),
    "wavlm-large": ("wavlm", "wavlm-large", "checkpoints/wavlm-large"),
}


def prepare_command(variant: str = "", manifest: str = "em2ldl.csv") -> str:
    """The `jaxser prepare` command that builds the data folder a variant reads."""
    split, suffix = EVALUATIONS[variant]
    return (f"jaxser prepare --manifest {manifest} --out data/em2ldl_{suffix} "
            f"--taxonomy em2ldl32 --split {split}")


def get_config(variant: str = ""):
    c = base_config()
    parts = [p for p in variant.split(",") if p]
    encoders = [p for p in parts if p in ENCODERS]
    evaluations = [p for p in parts if p not in ENCODERS]
    if (len(encoders) > 1 or len(evaluations) > 1
            or any(p not in EVALUATIONS and p != "smoke" for p in evaluations)):
        raise ValueError(f"unknown variant {variant!r} of configs/em2ldl_hubert.py: one of "
                         f"{', '.join(['smoke', *[v for v in EVALUATIONS if v]])} and/or one "
                         f"of {', '.join(ENCODERS)}, comma-separated")
    variant, encoder = (evaluations or [""])[0], (encoders or [""])[0]
    suffix = EVALUATIONS.get(variant, EVALUATIONS[""])[1]
    run = f"em2ldl_{encoder}" if encoder else "em2ldl_hubert"
    c.workdir = f"runs/{run}/{suffix}"  # Checkpoints, logs and eval reports.
    c.data.dir = f"data/em2ldl_{suffix}"  # Prepared by prepare_command(variant) (docs).
    c.data.global_batch = 32  # Utterances per step, as the paper.
    c.data.eval_batch = 32  # Utterances per evaluation batch.
    c.data.num_buckets = 4  # Length buckets: less padding, a few compiled shapes.

    # HuBERT (wavlm / wav2vec2 / whisper through this field), the preset (the checkpoint's
    # config wins) and the local HF folder (config + weights); see ENCODERS.
    c.model.encoder, c.model.size, c.model.pretrained = ENCODERS[encoder or "hubert-large"]
    c.model.pooling = "mean"  # Masked mean over the valid frames.
    c.model.head_hidden = 0  # Linear head onto the 32 classes.
    c.model.dropout = 0.0  # No dropout before the head.

    c.loss.kl = 1.0  # KL(target || prediction) on the log-softmax.
    c.loss.cosine = 0.3  # + 0.3 * (1 - cosine(prediction, target)).

    c.optim.name = "adam"  # Plain Adam, as the paper.
    c.optim.lr = 1e-5  # Whole model fine-tuned at 1e-5.
    c.optim.schedule = "constant"  # No decay, no warmup.
    c.optim.weight_decay = 0.0  # No weight decay.
    c.optim.clip_norm = 0.0  # No gradient clipping.

    c.train.epochs = 20  # Passes over the training split.
    c.train.eval_every = 0  # Validation once per epoch (best epoch).
    c.train.best_metric = "kl"  # Lowest validation KL picks the best epoch.
    c.train.best_tiebreak = "cosine"  # Ties of validation KL go to the higher cosine.
    c.train.keep_best = 1  # Only the best checkpoint is kept.
    c.train.log_every = 20  # Steps between logged training metrics.

    if variant == "smoke":
        common.smoke(c, run)
    return c
