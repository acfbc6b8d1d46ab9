"""Corpus adapters: turn a corpus as it is distributed into a jaxser manifest.

`jaxser manifest --corpus NAME --root DIR --out manifest.csv` walks the corpus' own folder
layout and label files and writes one manifest row per utterance (the project contract,
see DESIGN.md): `path` (relative to the manifest's folder), `id`, `speaker`, `corpus`,
`language`, `gender`, `age` (empty when unknown), group columns, and the label: either
`label` holding the corpus' OWN class name (harmonisation to a target taxonomy happens later,
in `jaxser prepare`, through map files) or, for EM2LDL, one column per class. Corpora with
emotion dimensions (IEMOCAP, MSP-IMPROV, MSP-Podcast) add `arousal`, `valence`, `dominance`
on the corpus' own scale and declare it in `dimension_scale` (e.g. `1-5`).

Each adapter is a function `root -> rows`: it reads file names and text label files only and
never decodes audio, so building a manifest of a large corpus takes seconds. Rows carry
absolute paths; `write_manifest` makes them relative to the manifest's folder, sorts them by
path and writes the CSV. Conventions shared by all adapters:

- labels are lowercase; `gender` is `female` / `male` (or empty when unknown);
- speaker ids are the corpus' own ids, so they are unique within a corpus only: code that
  merges corpora should key speakers by (corpus, speaker);
- a file found twice (e.g. Kaggle re-uploads that nest a second copy of the corpus) is kept
  once, the first copy in path order, and the duplicates are reported through `logging`;
- files whose names do not follow the corpus' scheme are skipped (and counted in the log).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

Row = dict[str, str]

# The leading columns of every manifest, in order; the rest follow in first-seen order.
BASE_COLUMNS = ("path", "id", "speaker", "corpus", "language", "gender", "age")

# What each adapter expects under --root; quoted in the error when nothing is found.
LAYOUTS: dict[str, str] = {
    "ravdess": "Actor_XX/03-01-EE-II-SS-RR-AA.wav (audio-only speech files)",
    "cremad": "AudioWAV/1001_DFA_ANG_XX.wav (+ optional VideoDemographics.csv)",
    "emodb": "wav/03a01Fa.wav",
    "tess": "OAF_angry/OAF_back_angry.wav, YAF_pleasant_surprised/YAF_back_ps.wav",
    "savee": "AudioData/DC/a01.wav or flat DC_a01.wav",
    "iemocap": (
        "Session{1-5}/dialog/EmoEvaluation/<dialog>.txt and "
        "Session{1-5}/sentences/wav/<dialog>/<utterance>.wav"
    ),
    "msp_improv": (
        "Evaluation.txt (or Evalution.txt) and "
        "Audio/session{1-6}/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.wav"
    ),
    "esd": "0001/Angry/[train|evaluation|test/]0001_000351.wav",
    "em2ldl": "a label CSV with an AudioID column (in the root, labels/ or label/) and "
    "wav/<AudioID>.wav or audio/<AudioID>.wav",
    "msp_podcast": "Labels/labels_consensus.csv (FileName, EmoClass, EmoAct, EmoVal, EmoDom, "
    "SpkrID, Gender, Split_Set) and Audios/<FileName>",
}

# Alternative spellings accepted for --corpus.
_ALIASES = {
    "crema_d": "cremad",
    "crema": "cremad",
    "emo_db": "emodb",
    "berlin": "emodb",
    "mspimprov": "msp_improv",
    "msp": "msp_improv",
    "msppodcast": "msp_podcast",
    "msp_podcast_challenge": "msp_podcast",
}


# ----------------------------------------------------------------------------- helpers


def _iter_wavs(root: Path) -> Iterator[Path]:
    """Yield every .wav file under root (any case, symlinks followed, macOS `._` files skipped)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".wav") and not name.startswith("._"):
                yield Path(dirpath) / name


def _abs(path: Path) -> str:
    """Absolute path without resolving symlinks (a symlinked corpus keeps its visible path)."""
    return os.path.abspath(path)


def _gender(value: str) -> str:
    """Normalise a corpus' gender spelling to `female` / `male`; unknown spellings pass through."""
    text = (value or "").strip()
    key = text.lower()
    if key in ("f", "female", "woman", "w", "女"):
        return "female"
    if key in ("m", "male", "man", "男"):
        return "male"
    return text


def _no_files(corpus: str, root: Path, what: str = "no audio files") -> ValueError:
    """The error raised when root holds nothing of the corpus: names it and the layout expected."""
    return ValueError(f"{corpus}: {what} found under {root}; expected layout: {LAYOUTS[corpus]}")


def _check_root(corpus: str, root: Path | str) -> Path:
    """Return root as a Path, or raise ValueError when it is not an existing folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"{corpus}: root {root} is not a folder; expected layout: {LAYOUTS[corpus]}"
        )
    return root


def _finish(corpus: str, root: Path, rows: list[Row], skipped: int = 0) -> list[Row]:
    """Sort rows by path, drop duplicate ids (keeping the first), log what was skipped.

    Raises ValueError (naming the corpus and its layout) when no row is left.
    """
    rows = sorted(rows, key=lambda r: r["path"])
    seen: set[str] = set()
    unique: list[Row] = []
    for row in rows:
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        unique.append(row)
    if len(unique) < len(rows):
        log.warning(
            "%s: %d duplicate files (same id) skipped, first copy in path order kept",
            corpus,
            len(rows) - len(unique),
        )
    if skipped:
        log.info("%s: %d files skipped (named otherwise, or not wanted)", corpus, skipped)
    if not unique:
        raise _no_files(corpus, root, "no files of this corpus")
    return unique


# ----------------------------------------------------------------------------- RAVDESS

_RAVDESS_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}


def ravdess(root: Path) -> list[Row]:
    """RAVDESS speech: `Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`, seven two-digit fields.

    MM modality (03 audio-only; 01/02 are video files and skipped), VV vocal channel (01 speech;
    02 song is skipped), EE emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry,
    06 fearful, 07 disgust, 08 surprised), II intensity (01 normal, 02 strong), SS statement
    (01 "Kids are talking by the door", 02 "Dogs are sitting by the door"), RR repetition,
    AA actor 01-24 (odd male, even female). Speaker `Actor_AA`, language en, age unknown.
    Extra columns: intensity, statement, repetition, emotion_source (intended, i.e. acted).
    """
    root = _check_root("ravdess", root)
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        m = _RAVDESS_NAME.match(wav.stem)
        if not m:
            skipped += 1
            continue
        modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
        if modality != "03" or channel != "01" or emotion not in _RAVDESS_EMOTIONS:
            skipped += 1
            continue
        rows.append(
            {
                "path": _abs(wav),
                "id": wav.stem,
                "speaker": f"Actor_{actor}",
                "corpus": "ravdess",
                "language": "en",
                "gender": "male" if int(actor) % 2 else "female",
                "age": "",
                "label": _RAVDESS_EMOTIONS[emotion],
                "intensity": {"01": "normal", "02": "strong"}.get(intensity, intensity),
                "statement": statement,
                "repetition": repetition,
                "emotion_source": "intended",
            }
        )
    return _finish("ravdess", root, rows, skipped)


# ----------------------------------------------------------------------------- CREMA-D

_CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
_CREMAD_LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}


def _cremad_demographics(root: Path) -> dict[str, dict[str, str]]:
    """ActorID -> {Age, Sex, Race, Ethnicity} from VideoDemographics.csv, or {} if absent."""
    candidates = sorted(p for p in root.rglob("VideoDemographics.csv") if p.is_file())
    if not candidates:
        log.warning("cremad: no VideoDemographics.csv under %s, gender and age left empty", root)
        return {}
    with open(candidates[0], newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        table = {}
        for rec in reader:
            rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
            if rec.get("ActorID"):
                table[rec["ActorID"]] = rec
    return table


def cremad(root: Path) -> list[Row]:
    """CREMA-D: `AudioWAV/SSSS_TTT_EEE_LL.wav`.

    SSSS actor id (1001-1091), TTT sentence code (IEO, TIE, IOM, IWW, TAI, MTI, IWL, ITH, DFA,
    ITS, TSI, WSI), EEE intended emotion (ANG, DIS, FEA, HAP, NEU, SAD; written lowercase as
    the label), LL level (LO, MD, HI; XX unspecified). Gender and age come from
    `VideoDemographics.csv` (ActorID, Age, Sex, Race, Ethnicity) when it is anywhere under
    root, else they are empty. Extra columns: sentence, level, intensity, race, ethnicity,
    emotion_source (intended; the crowd-sourced perceived labels are not read).
    """
    root = _check_root("cremad", root)
    demographics = None
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        m = _CREMAD_NAME.match(wav.stem)
        if not m or m.group(3) not in _CREMAD_EMOTIONS:
            skipped += 1
            continue
        if demographics is None:
            demographics = _cremad_demographics(root)
        actor, sentence, emotion, level = m.groups()
        info = demographics.get(actor, {})
        rows.append(
            {
                "path": _abs(wav),
                "id": wav.stem,
                "speaker": actor,
                "corpus": "cremad",
                "language": "en",
                "gender": _gender(info.get("Sex", "")),
                "age": info.get("Age", ""),
                "label": emotion.lower(),
                "sentence": sentence,
                "level": level,
                "intensity": _CREMAD_LEVELS.get(level, level),
                "race": info.get("Race", ""),
                "ethnicity": info.get("Ethnicity", ""),
                "emotion_source": "intended",
            }
        )
    return _finish("cremad", root, rows, skipped)


# ----------------------------------------------------------------------------- EmoDB

_EMODB_NAME = re.compile(r"^(\d{2})([a-z]\d{2})([WLEAFTN])([a-z])$")
_EMODB_EMOTIONS = {
    "W": "anger",  # Wut / Aerger
    "L": "boredom",  # Langeweile
    "E": "disgust",  # Ekel
    "A": "fear",  # Angst
    "F": "happiness",  # Freude
    "T": "sadness",  # Trauer
    "N": "neutral",
}
# speaker -> (gender, age), from the corpus documentation.
_EMODB_SPEAKERS = {
    "03": ("male", "31"),
    "08": ("female", "34"),
    "09": ("female", "21"),
    "10": ("male", "32"),
    "11": ("male", "26"),
    "12": ("male", "30"),
    "13": ("female", "32"),
    "14": ("female", "35"),
    "15": ("male", "25"),
    "16": ("female", "31"),
}


def emodb(root: Path) -> list[Row]:
    """Berlin EmoDB: `wav/SSTTTEV.wav`, e.g. `03a01Fa.wav`.

    SS speaker (03, 08-16), TTT text code (a01, a02, a04, a05, a07, b01, b02, b03, b09, b10),
    E emotion by its German initial (W anger, L boredom, E disgust, A fear, F happiness,
    T sadness, N neutral; written as the English name), V version letter. Gender and age come
    from the speaker table of the corpus documentation. Language de. Extra columns: text,
    version, emotion_code, emotion_source (intended).
    """
    root = _check_root("emodb", root)
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        m = _EMODB_NAME.match(wav.stem)
        if not m:
            skipped += 1
            continue
        speaker, text, code, version = m.groups()
        gender, age = _EMODB_SPEAKERS.get(speaker, ("", ""))
        rows.append(
            {
                "path": _abs(wav),
                "id": wav.stem,
                "speaker": speaker,
                "corpus": "emodb",
                "language": "de",
                "gender": gender,
                "age": age,
                "label": _EMODB_EMOTIONS[code],
                "text": text,
                "version": version,
                "emotion_code": code,
                "emotion_source": "intended",
            }
        )
    return _finish("emodb", root, rows, skipped)


# ----------------------------------------------------------------------------- TESS

_TESS_LABELS = {
    "angry": "angry",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "ps": "pleasant_surprise",
    "pleasant_surprise": "pleasant_surprise",
    "pleasant_surprised": "pleasant_surprise",
}
_TESS_SPEAKERS = {"OAF": "64", "YAF": "26"}  # speaker -> age (both actresses)


def _tess_speaker(token: str) -> str:
    """OAF / YAF from a name token `OAF`, `OA`, `YAF` or `YA` (any case); '' otherwise."""
    return {"OAF": "OAF", "OA": "OAF", "YAF": "YAF", "YA": "YAF"}.get(token.upper(), "")


def tess(root: Path) -> list[Row]:
    """TESS: `OAF_angry/OAF_back_angry.wav`, `YAF_pleasant_surprised/YAF_back_ps.wav`.

    File names are `<speaker>_<word>_<emotion>`: speaker OAF (older actress, 64) or YAF
    (younger actress, 26), both female, English; the target word of "Say the word ..."; the
    emotion angry, disgust, fear, happy, neutral, sad or ps (pleasant surprise). The label
    comes from the file name (folder names vary: `OAF_Fear`, `YAF_pleasant_surprised`); some
    files write the speaker `OA` / `YA` or leave it out, then the folder's prefix supplies it.
    Labels: angry, disgust, fear, happy, neutral, sad, pleasant_surprise. The Kaggle copy
    holds the corpus twice; the duplicate is dropped.
    Extra columns: word, emotion_source (intended).
    """
    root = _check_root("tess", root)
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        tokens = wav.stem.split("_")
        speaker = _tess_speaker(tokens[0])
        if speaker:
            tokens = tokens[1:]
        else:
            speaker = _tess_speaker(wav.parent.name.split("_", 1)[0])
        label = _TESS_LABELS.get("_".join(tokens[1:]).lower())
        if not speaker or label is None or not tokens or not tokens[0]:
            skipped += 1
            continue
        word = tokens[0].lower()
        rows.append(
            {
                "path": _abs(wav),
                "id": f"{speaker}_{word}_{label}",
                "speaker": speaker,
                "corpus": "tess",
                "language": "en",
                "gender": "female",
                "age": _TESS_SPEAKERS[speaker],
                "label": label,
                "word": word,
                "emotion_source": "intended",
            }
        )
    return _finish("tess", root, rows, skipped)


# ----------------------------------------------------------------------------- SAVEE

_SAVEE_SPEAKERS = ("DC", "JE", "JK", "KL")
_SAVEE_FILE = re.compile(r"^(sa|su|a|d|f|h|n)(\d{2})$")
_SAVEE_FLAT = re.compile(r"^(DC|JE|JK|KL)_(sa|su|a|d|f|h|n)(\d{2})$")
_SAVEE_EMOTIONS = {
    "a": "anger",
    "d": "disgust",
    "f": "fear",
    "h": "happiness",
    "n": "neutral",
    "sa": "sadness",
    "su": "surprise",
}


def savee(root: Path) -> list[Row]:
    """SAVEE: `AudioData/DC/a01.wav` (official) or flat `DC_a01.wav` (Kaggle copy).

    Speakers DC, JE, JK, KL: four male British English speakers (ages 27-31, per speaker
    unknown). The file prefix is the emotion: a anger, d disgust, f fear, h happiness,
    n neutral, sa sadness, su surprise; then the sentence number (01-15, neutral 01-30).
    Extra columns: sentence (the prefix and number, e.g. `sa03`), emotion_source (intended).
    """
    root = _check_root("savee", root)
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        flat = _SAVEE_FLAT.match(wav.stem)
        nested = _SAVEE_FILE.match(wav.stem)
        if flat:
            speaker, code, number = flat.groups()
        elif nested and wav.parent.name in _SAVEE_SPEAKERS:
            speaker, (code, number) = wav.parent.name, nested.groups()
        else:
            skipped += 1
            continue
        rows.append(
            {
                "path": _abs(wav),
                "id": f"{speaker}_{code}{number}",
                "speaker": speaker,
                "corpus": "savee",
                "language": "en",
                "gender": "male",
                "age": "",
                "label": _SAVEE_EMOTIONS[code],
                "sentence": f"{code}{number}",
                "emotion_source": "intended",
            }
        )
    return _finish("savee", root, rows, skipped)


# ----------------------------------------------------------------------------- IEMOCAP

_IEMOCAP_LINE = re.compile(
    r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\d{2}[FM]_\S+)\s+(\S+)\s+"
    r"\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]"
)


def _iemocap_eval_dirs(root: Path) -> list[Path]:
    """Every `Session*/dialog/EmoEvaluation` folder under root, sorted."""
    found = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        if here.name == "EmoEvaluation" and here.parent.name == "dialog":
            found.append(here)
            dirnames[:] = []  # Categorical/, Attribute/, Self-evaluation/ are not needed
    return found


def iemocap(root: Path, merge_excited: bool = True) -> list[Row]:
    """IEMOCAP: consensus labels from `Session{N}/dialog/EmoEvaluation/<dialog>.txt`.

    Each utterance line reads `[start - end]<TAB>utterance<TAB>label<TAB>[V, A, D]`, e.g.
    `[6.2901 - 8.2357]  Ses01F_impro01_F000  neu  [2.5000, 2.5000, 2.5000]`; the audio is
    `Session{N}/sentences/wav/<dialog>/<utterance>.wav` with `<dialog>` the utterance id less
    its last `_` part. The times are where the utterance sits in the dialog recording; the
    sentence wav holds the utterance alone, so they are written as dialog_start / dialog_end
    (not start / end, which would cut a segment out of the sentence wav). In
    `Ses01F_impro01_F000` the `F` of `Ses01F` is who wore the markers in that dialog; the
    speaking actor's gender is the first letter of the last part (`F000`), so the speaker is
    `Ses01_F` (each session has one female and one male actor).
    Labels as the corpus writes them: neu, hap, exc, sad, ang, fru, sur, fea, dis, oth, xxx;
    with `merge_excited` (default) `exc` is relabelled `hap` (the usual 4-class setting) and
    `original_label` keeps the corpus' label. Rows are written even when the wav is missing
    (prepare rejects them with a reason); their number is logged. The dimensions valence,
    arousal, dominance are the evaluators' mean on IEMOCAP's 1-5 scale (dimension_scale
    1-5). Extra columns: session, dialog, method (improvised / scripted), dialog_start,
    dialog_end, original_label, emotion_source (perceived).
    """
    root = _check_root("iemocap", root)
    rows, missing = [], 0
    for eval_dir in _iemocap_eval_dirs(root):
        session_dir = eval_dir.parent.parent
        for txt in sorted(eval_dir.glob("*.txt")):
            if txt.name.startswith("._"):
                continue
            with open(txt, encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = _IEMOCAP_LINE.match(line.strip())
                    if not m:
                        continue
                    start, end, utt, raw, val, act, dom = m.groups()
                    dialog, last = utt.rsplit("_", 1)
                    wav = session_dir / "sentences" / "wav" / dialog / f"{utt}.wav"
                    missing += not wav.is_file()
                    label = "hap" if merge_excited and raw == "exc" else raw
                    rows.append(
                        {
                            "path": _abs(wav),
                            "id": utt,
                            "speaker": f"{utt[:5]}_{last[0]}",
                            "corpus": "iemocap",
                            "language": "en",
                            "gender": _gender(last[0]),
                            "age": "",
                            "label": label,
                            "session": utt[:5],
                            "dialog": dialog,
                            "method": "improvised" if "_impro" in dialog else "scripted",
                            "dialog_start": start,
                            "dialog_end": end,
                            "valence": val,
                            "arousal": act,
                            "dominance": dom,
                            "dimension_scale": "1-5",
                            "original_label": raw,
                            "emotion_source": "perceived",
                        }
                    )
    if missing:
        log.warning("iemocap: %d labelled utterances have no wav file (rows kept)", missing)
    if not rows:
        raise _no_files("iemocap", root, "no EmoEvaluation label lines")
    return _finish("iemocap", root, rows)


# ----------------------------------------------------------------------------- MSP-IMPROV

_MSP_EMOTIONS = {
    "A": "angry",
    "H": "happy",
    "S": "sad",
    "N": "neutral",
    "O": "other",
    "X": "no_agreement",
}
# Recording type letter -> (method, recording type); see the msp_improv docstring.
_MSP_TYPES = {
    "R": ("read", "target_read"),
    "S": ("improvised", "target_improvised"),
    "T": ("improvised", "other_improvised"),
    "P": ("natural", "natural_interaction"),
}
_MSP_ID = re.compile(r"^(?:MSP|UTD)-IMPROV-(S(\d{2})([A-Z]))-(([FM])(\d{2}))-([A-Z])-(\w+)$")


def _msp_label_file(root: Path) -> Path | None:
    """The consensus label file (`Evaluation.txt`, also spelled `Evalution.txt`), or None."""
    for name in ("Evaluation.txt", "Evalution.txt"):
        if (root / name).is_file():
            return root / name
        hits = sorted(p for p in root.rglob(name) if p.is_file())
        if hits:
            return hits[0]
    return None


def _msp_scores(fields: list[str]) -> dict[str, str]:
    """`A:4.0; V:2.0; D:2.5; N:0.0` fields -> {arousal, valence, dominance, naturalness}."""
    names = {"A": "arousal", "V": "valence", "D": "dominance", "N": "naturalness"}
    scores = {}
    for field in fields:
        key, _, value = field.partition(":")
        if key.strip() in names and value.strip():
            scores[names[key.strip()]] = value.strip()
    return scores


def msp_improv(root: Path) -> list[Row]:
    """MSP-IMPROV: labels from `Evaluation.txt`, audio `Audio/session{N}/S01A/P/<id>.wav`.

    Label lines: `UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:4.0; V:2.0; D:2.5; N:0.0;` (the label
    file names clips UTD-IMPROV-..., the audio MSP-IMPROV-...; other lines, the individual
    evaluations, are ignored). The consensus letter is written as: A angry, H happy, S sad,
    N neutral, O other, X no_agreement (an unknown letter is written lowercase as is).
    Id fields: `S01A` target sentence 01 whose scenario targets emotion A (column
    target_emotion); `F01` the speaking actor, gender F, session 01: the speaker is `F01`
    (12 actors, F01-F06 and M01-M06, one pair per session); `P` the recording type; `FM01`
    the take. Assumed recording types (folder names R, S, T, P of the release): R target
    sentence read (method read), S target sentence in the improvisation (improvised),
    T other turns of the improvisation (improvised), P natural interaction between the
    scenes (natural); the letter is kept in method_code. Wavs with no label line are skipped;
    label lines with no wav are kept with the release's path (prepare rejects them), both
    counted in the log. The dimensions arousal, valence, dominance are on MSP-IMPROV's 1-5
    scale (dimension_scale 1-5). Extra columns: session, sentence, target_emotion, method,
    method_code, recording_type, naturalness, emotion_source (perceived).
    """
    root = _check_root("msp_improv", root)
    wavs = {w.stem: w for w in _iter_wavs(root) if _MSP_ID.match(w.stem)}
    label_file = _msp_label_file(root)
    if label_file is None:
        what = "no Evaluation.txt label file" if wavs else "no label file and no audio files"
        raise _no_files("msp_improv", root, what)
    audio_root = label_file.parent / "Audio"
    rows, missing, used = [], 0, set()
    with open(label_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = [x.strip() for x in line.strip().split(";")]
            clip = os.path.splitext(fields[0])[0]
            m = _MSP_ID.match(clip)
            if not m or len(fields) < 2:
                continue
            sentence, _, target, speaker, gender, session, code, _ = m.groups()
            utt = "MSP-IMPROV-" + clip.split("-", 2)[2]
            wav = wavs.get(utt)
            if wav is None:
                missing += 1
                wav = audio_root / f"session{int(session)}" / sentence / code / f"{utt}.wav"
            used.add(utt)
            letter = fields[1].upper()
            method, recording = _MSP_TYPES.get(code, ("", ""))
            rows.append(
                {
                    "path": _abs(wav),
                    "id": utt,
                    "speaker": speaker,
                    "corpus": "msp_improv",
                    "language": "en",
                    "gender": _gender(gender),
                    "age": "",
                    "label": _MSP_EMOTIONS.get(letter, letter.lower()),
                    "session": str(int(session)),
                    "sentence": sentence,
                    "target_emotion": _MSP_EMOTIONS.get(target, target.lower()),
                    "method": method,
                    "method_code": code,
                    "recording_type": recording,
                    **_msp_scores(fields[2:]),
                    "dimension_scale": "1-5",
                    "emotion_source": "perceived",
                }
            )
    if missing:
        log.warning("msp_improv: %d labelled clips have no wav file (rows kept)", missing)
    unlabelled = len(set(wavs) - used)
    if unlabelled:
        log.warning("msp_improv: %d wav files have no label line (skipped)", unlabelled)
    if not rows:
        raise _no_files("msp_improv", root, f"no label lines in {label_file}")
    return _finish("msp_improv", root, rows)


# ----------------------------------------------------------------------------- MSP-Podcast

_PODCAST_EMOTIONS = {
    "A": "angry",
    "S": "sad",
    "H": "happy",
    "U": "surprise",
    "F": "fear",
    "D": "disgust",
    "C": "contempt",
    "N": "neutral",
}
_PODCAST_NO_CLASS = {"O": "other", "X": "no_agreement"}
_PODCAST_SPLITS = {"train": "train", "development": "validation", "dev": "validation",
                   "validation": "validation", "test1": "test", "test2": "test",
                   "test3": "test", "test": "test"}
_PODCAST_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender",
                    "Split_Set")


def _podcast_label_file(root: Path) -> Path | None:
    """`Labels/labels_consensus.csv` (or anywhere under root), or None."""
    for candidate in (root / "Labels" / "labels_consensus.csv", root / "labels_consensus.csv"):
        if candidate.is_file():
            return candidate
    hits = sorted(p for p in root.rglob("labels_consensus.csv") if p.is_file())
    return hits[0] if hits else None


def _podcast_speaker(value: str) -> str:
    """The release's SpkrID as a speaker id; `unknown` for Unknown / empty / -1."""
    text = (value or "").strip()
    if not text or text.lower() in ("unknown", "unk", "-1", "nan", "none"):
        return "unknown"
    return text


def msp_podcast(root: Path, keep_other: bool = False) -> list[Row]:
    """MSP-Podcast: `Labels/labels_consensus.csv` and the audio in `Audios/<FileName>`.

    Label file columns: FileName (e.g. `MSP-PODCAST_0001_0008.wav`), EmoClass (the consensus
    category: A angry, S sad, H happy, U surprise, F fear, D disgust, C contempt, N neutral,
    O other, X no agreement), EmoAct, EmoVal, EmoDom (the mean arousal, valence and dominance
    ratings, 1-7 scale: written as arousal, valence, dominance with dimension_scale 1-7),
    SpkrID, Gender (Male / Female / Unknown), Split_Set (Train, Development, Test1, Test2, ...).

    - Categories: the eight classes of the challenge's categorical task. O and X have no
      category (the challenge trains and scores categories without them): the row is written
      with an empty label and keeps its dimensions, `original_label` keeps the code;
      `keep_other` writes them as `other` / `no_agreement` instead.
    - The official split is the `split` column (Train -> train, Development -> validation,
      Test1/Test2/Test3 -> test; `msp_split` keeps the release's name, a group column, so
      reports give Test1 and Test2 apart): prepare it with `--split column:split`.
    - Unknown speakers: SpkrID Unknown (or empty) is written as speaker `unknown`. The
      official split is speaker-independent by construction and keeps such rows; a split that
      deals speakers (speaker:, kfold:) rejects them unless prepare is told how
      (`--unknown-speakers utterance`: each its own speaker, at the risk of one person on both
      sides of the split).
    Rows whose audio file is missing are written with the release's path (prepare rejects
    them with a reason) and counted in the log. Extra columns: split, msp_split,
    original_label, emotion_source (perceived).
    """
    root = _check_root("msp_podcast", root)
    label_file = _podcast_label_file(root)
    if label_file is None:
        raise _no_files("msp_podcast", root, "no labels_consensus.csv")
    base = label_file.parent.parent if label_file.parent.name == "Labels" else label_file.parent
    audio_dir = base / "Audios"
    with open(label_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [(h or "").strip() for h in reader.fieldnames or []]
        absent = [c for c in _PODCAST_COLUMNS if c not in header]
        if absent:
            raise ValueError(f"msp_podcast: {label_file} lacks columns {absent}; expected "
                             f"layout: {LAYOUTS['msp_podcast']}")
        records = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k}
                   for r in reader]
    rows, missing, unknown = [], 0, 0
    for rec in records:
        name = rec["FileName"]
        if not name:
            continue
        if not name.lower().endswith(".wav"):
            name += ".wav"
        wav = audio_dir / name
        missing += not wav.is_file()
        code = rec["EmoClass"].upper()
        if code in _PODCAST_EMOTIONS:
            label = _PODCAST_EMOTIONS[code]
        elif code in _PODCAST_NO_CLASS:
            label = _PODCAST_NO_CLASS[code] if keep_other else ""
        else:
            label = code.lower()
        speaker = _podcast_speaker(rec["SpkrID"])
        unknown += speaker == "unknown"
        split = rec["Split_Set"]
        rows.append(
            {
                "path": _abs(wav),
                "id": name[:-4],
                "speaker": speaker,
                "corpus": "msp_podcast",
                "language": "en",
                "gender": "" if rec["Gender"].lower() == "unknown" else _gender(rec["Gender"]),
                "age": "",
                "label": label,
                "arousal": rec["EmoAct"],
                "valence": rec["EmoVal"],
                "dominance": rec["EmoDom"],
                "dimension_scale": "1-7",
                "split": _PODCAST_SPLITS.get(split.lower(), split),
                "msp_split": split,
                "original_label": rec["EmoClass"],
                "emotion_source": "perceived",
            }
        )
    if missing:
        log.warning("msp_podcast: %d labelled files have no wav under %s (rows kept)", missing,
                    audio_dir)
    if unknown:
        log.warning("msp_podcast: %d rows have an unknown speaker (speaker 'unknown'): fine "
                    "with the official split (--split column:split), rejected by splits that "
                    "deal speakers unless --unknown-speakers utterance", unknown)
    if not rows:
        raise _no_files("msp_podcast", root, f"no label rows in {label_file}")
    return _finish("msp_podcast", root, rows)


# ----------------------------------------------------------------------------- ESD

_ESD_NAME = re.compile(r"^(\d{4})_(\d{6})$")
_ESD_EMOTIONS = ("angry", "happy", "neutral", "sad", "surprise")
_ESD_SPLITS = ("train", "evaluation", "test")
# Speaker genders as listed in the ESD release's README.
_ESD_FEMALE = {"0001", "0002", "0003", "0007", "0009", "0015", "0016", "0017", "0018", "0019"}


def esd(root: Path) -> list[Row]:
    """ESD (Emotional Speech Dataset): `0001/Angry/0001_000351.wav`.

    Speakers 0001-0010 speak Mandarin (language zh), 0011-0020 English (en). The emotion is
    the folder: Angry, Happy, Neutral, Sad, Surprise (written lowercase); older releases put
    the wavs one level deeper in train/ evaluation/ test/ (kept as column esd_split). File
    `SSSS_NNNNNN`: 350 parallel sentences per emotion, numbered 1-350 neutral, 351-700 angry,
    701-1050 happy, 1051-1400 sad, 1401-1750 surprise; text_id = (NNNNNN - 1) % 350 + 1 is
    the sentence, shared across emotions of one speaker. Genders from the release README:
    female 0001, 0002, 0003, 0007, 0009, 0015-0019; male 0004, 0005, 0006, 0008, 0010,
    0011-0014, 0020. Extra columns: text_id, esd_split, emotion_source (intended).
    """
    root = _check_root("esd", root)
    rows, skipped = [], 0
    for wav in _iter_wavs(root):
        m = _ESD_NAME.match(wav.stem)
        folder, split = wav.parent.name.lower(), ""
        if folder in _ESD_SPLITS:
            folder, split = wav.parent.parent.name.lower(), folder
        if not m or folder not in _ESD_EMOTIONS or not 1 <= int(m.group(1)) <= 20:
            skipped += 1
            continue
        speaker, number = m.groups()
        rows.append(
            {
                "path": _abs(wav),
                "id": wav.stem,
                "speaker": speaker,
                "corpus": "esd",
                "language": "zh" if int(speaker) <= 10 else "en",
                "gender": "female" if speaker in _ESD_FEMALE else "male",
                "age": "",
                "label": folder,
                "text_id": str((int(number) - 1) % 350 + 1),
                "esd_split": split,
                "emotion_source": "intended",
            }
        )
    return _finish("esd", root, rows, skipped)


# ----------------------------------------------------------------------------- EM2LDL

EM2LDL_CLASSES = (
    "ecstacy", "joy", "serenity", "admiration", "trust", "acceptance", "terror", "fear",
    "apprehension", "amazement", "surprise", "distraction", "grief", "sadness", "pensiveness",
    "loathing", "disgust", "boredom", "rage", "anger", "annoyance", "vigilance", "anticipation",
    "interest", "love", "submission", "awe", "disapproval", "remorse", "contempt",
    "aggressiveness", "optimism",
)  # fmt: skip
# EM2LDL column -> manifest column, for the columns that the contract names.
_EM2LDL_RENAME = {
    "AudioID": "id",
    "speaker ID": "speaker",
    "gender": "gender",
    "age": "age",
    "lang": "language",
    "aggresiveness": "aggressiveness",  # The released label CSV's spelling.
}


def _em2ldl_label_csv(root: Path) -> Path | None:
    """The first CSV (root, labels/, label/) whose header has an AudioID column, or None."""
    for folder in (root, root / "labels", root / "label"):
        for candidate in sorted(folder.glob("*.csv")):
            with open(candidate, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f, skipinitialspace=True), [])
            if "AudioID" in [h.strip() for h in header]:
                return candidate
    return None


def em2ldl(root: Path) -> list[Row]:
    """EM2LDL: a label CSV (in the root, labels/ or label/) plus `wav/` or `audio/` folder.

    CSV header: `AudioID, <32 class columns>, speaker ID, gender, age, ageClass, mbtiSingle,
    mbtiDouble, lang` (spaces after commas allowed). The 32 class columns (EM2LDL_CLASSES,
    spelled as the corpus spells them, `ecstacy` included) keep their values exactly as
    given; `speaker ID` becomes speaker, `lang` language; other columns (ageClass,
    mbtiSingle, mbtiDouble, ...) are kept under their own names. Audio `<AudioID>.wav` is
    looked up anywhere under wav/ or audio/ (or root); rows whose wav is missing are still
    written, with the path where it should be (prepare rejects them with a reason), and their
    number is logged.
    """
    root = _check_root("em2ldl", root)
    label_csv = _em2ldl_label_csv(root)
    if label_csv is None:
        raise _no_files("em2ldl", root, "no label CSV with an AudioID column")
    audio_dirs = [d for d in (root / "wav", root / "audio") if d.is_dir()]
    wavs: dict[str, Path] = {}
    for folder in audio_dirs or [root]:
        for wav in _iter_wavs(folder):
            wavs.setdefault(wav.stem, wav)
    default_dir = audio_dirs[0] if audio_dirs else root / "wav"
    with open(label_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [_EM2LDL_RENAME.get(h.strip(), h.strip()) for h in reader.fieldnames or []]
        absent = [c for c in EM2LDL_CLASSES if c not in header]
        if absent:
            raise ValueError(f"em2ldl: {label_csv} lacks class columns {absent}")
        records = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    rows, missing = [], 0
    for rec in records:
        audio_id = rec.get("AudioID", "")
        if not audio_id:
            continue
        stem = audio_id[:-4] if audio_id.lower().endswith(".wav") else audio_id
        wav = wavs.get(stem)
        if wav is None:
            missing += 1
            wav = default_dir / f"{stem}.wav"
        row = {"path": _abs(wav), "corpus": "em2ldl"}
        for key, value in rec.items():
            if key and key != "path" and key != "corpus":
                row[_EM2LDL_RENAME.get(key, key)] = value
        row["id"] = stem
        row["gender"] = _gender(row.get("gender", ""))
        rows.append(row)
    if missing:
        log.warning("em2ldl: %d of %d rows have no wav file (rows kept)", missing, len(rows))
    if not rows:
        raise _no_files("em2ldl", root, f"no label rows in {label_csv}")
    return _finish("em2ldl", root, rows)


# ----------------------------------------------------------------------------- manifest

ADAPTERS: dict[str, Callable[..., list[Row]]] = {
    "ravdess": ravdess,
    "cremad": cremad,
    "emodb": emodb,
    "tess": tess,
    "savee": savee,
    "iemocap": iemocap,
    "msp_improv": msp_improv,
    "esd": esd,
    "em2ldl": em2ldl,
    "msp_podcast": msp_podcast,
}


def resolve_corpus(name: str) -> str:
    """Canonical adapter name for `name` (case, `-` and a few aliases tolerated)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in ADAPTERS:
        raise ValueError(f"unknown corpus {name!r}; valid corpora: {', '.join(sorted(ADAPTERS))}")
    return key


def _relative(path: str, base: str) -> str:
    """`path` relative to the folder `base` (POSIX separators), or absolute when impossible."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # e.g. another drive on Windows
        return Path(path).as_posix()


def _columns(rows: list[Row]) -> list[str]:
    """The base columns first, then every other key in first-seen order."""
    columns = list(BASE_COLUMNS)
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def write_manifest(corpus: str, root: str | Path, out: str | Path, **options) -> int:
    """Write the manifest of the corpus under `root` to the CSV `out`; return the rows written.

    `options` go to the adapter (e.g. `merge_excited=False` for iemocap). Paths are written
    relative to `out`'s folder and rows sorted by that path. Raises ValueError for an unknown
    corpus name (listing the valid ones) or when root holds no files of the corpus (naming
    the layout expected).
    """
    name = resolve_corpus(corpus)
    out = Path(out)
    base = os.path.abspath(out.parent)
    rows = ADAPTERS[name](Path(root), **options)
    for row in rows:
        row["path"] = _relative(row["path"], base)
    rows.sort(key=lambda r: r["path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    log.info("%s: %d rows written to %s", name, len(rows), out)
    return len(rows)
