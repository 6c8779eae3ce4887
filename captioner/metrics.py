"""Caption scores through pycocoevalcap, the scorer published numbers are computed with.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (coco-caption's ``Cider`` is the CIDEr-D variant:
clipped counts, Gaussian length penalty, sigma 6). Captions are tokenized by the Stanford
PTB tokenizer, as in coco-caption; it and METEOR run on Java. Reimplementing them would
make our numbers incomparable the moment one detail differed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Iterator, Mapping, Sequence

from captioner.errors import CaptionerError

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise CaptionerError("caption scoring needs Java on PATH (the PTB tokenizer and METEOR are Java programs)")


def tokenize_for_scoring(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """PTB-tokenize, lowercase and strip punctuation, as coco-caption does before scoring.

    The tokenizer reads one caption per line, and replaces only ``\\n`` inside a caption; a
    ``\\r`` or U+2028 would split a caption in two and shift every later one onto the wrong
    image. Every line boundary becomes a space first.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _require_java()
    one_line = {key: [{"caption": " ".join(c.splitlines())} for c in caps] for key, caps in captions.items()}
    with _quiet_stderr():  # the Java tokenizer reports its speed (and "Untokenizable" characters) there
        return PTBTokenizer().tokenize(one_line)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: child processes inherit it, so their chatter goes too."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def score_captions(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    *,
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus scores of one candidate per image against that image's references.

    Args:
        references: image id -> reference captions (raw text).
        candidates: image id -> generated caption (raw text); same ids as ``references``.
        meteor: also compute METEOR (starts a JVM with a 2 GB heap; skip it for quick checks).
    Returns:
        ``{"BLEU-1": ..., "CIDEr-D": ...}`` as fractions (CIDEr-D unscaled, e.g. 0.55).
    Raises:
        CaptionerError: ids differ, an image has no reference caption, or Java is missing.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenized(references, candidates)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            _stop(meteor)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return scores


def per_image_cider(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Each image's CIDEr-D (document frequencies from all of ``references``), tokenized as for scoring.

    Raises:
        CaptionerError: as :func:`score_captions`.
    """
    from pycocoevalcap.cider.cider import Cider

    gts, res = _tokenized(references, candidates)
    _, scores = Cider().compute_score(gts, res)
    return {key: float(score) for key, score in zip(gts, scores, strict=True)}


def _tokenized(references: Mapping[str, Sequence[str]],
               candidates: Mapping[str, str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """PTB-tokenized references and candidates, after the checks pycocoevalcap would fail on far from the cause."""
    if set(references) != set(candidates):
        raise CaptionerError("references and candidates must cover the same image ids")
    if not candidates:
        raise CaptionerError("no captions to score")
    empty = [key for key, captions in references.items() if not any(str(c).strip() for c in captions)]
    if empty:  # pycocoevalcap would fail on an assert, far from the cause
        raise CaptionerError(f"image {empty[0]} has no reference captions to score against")
    gts = tokenize_for_scoring(references)
    wordless = [key for key, refs in gts.items() if not any(ref.strip() for ref in refs)]
    if wordless:  # e.g. only "..." as a reference: BLEU would fail deep inside the scorer
        raise CaptionerError(f"image {wordless[0]}'s reference captions have no words once punctuation is removed")
    res = tokenize_for_scoring({key: [caption] for key, caption in candidates.items()})
    return gts, res


def _stop(meteor) -> None:
    """Stop METEOR's JVM now, even after Ctrl-C mid-score.

    pycocoevalcap's ``Meteor.__del__`` waits for the lock that an interrupted
    ``compute_score`` still holds, so the interpreter would hang at exit.
    """
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    if meteor.lock.locked():
        meteor.lock.release()
