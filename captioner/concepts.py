"""Classifier-guided decoding: words the encoder's own ImageNet head is sure it sees.

A caption corpus as small as Flickr8k has few cats, cups or rockets, so its decoder's
language prior drowns them ("a small dog is playing"). The encoder's classifier, trained
on 1.2 M ImageNet photos, knows better. Each class is grounded in the plain words a
caption writer would use for it (``grounding.json``, written and reviewed with
``tools/ground_classes.py``: espresso -> coffee, cup; moped -> scooter, motorcycle; tabby
-> cat; otherwise the label's head noun: "Egyptian cat" -> cat), and a model
keeps the words its vocabulary has. A caption word's *evidence* for an image is the summed
probability of the classes grounded in it. During search, a word with evidence at or
above a threshold gets ``boost * evidence`` added to its log-probability until the
hypothesis has used it once (in the spirit of tag-guided decoding, Anderson et al.,
EMNLP 2017).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from captioner.vocab import Vocabulary, tokenize

GROUNDING_FILE = Path(__file__).with_name("grounding.json")


def head_noun(label: str) -> str | None:
    """Last word of a class label, lowercased ("tiger cat" -> "cat")."""
    words = tokenize(label)
    return words[-1] if words else None


@functools.cache
def grounded_words() -> dict[str, tuple[str, ...]]:
    """ImageNet label -> the caption words that name it, from the shipped ``grounding.json``."""
    entries = json.loads(GROUNDING_FILE.read_text(encoding="utf-8"))
    return {entry["label"]: tuple(entry["words"]) for entry in entries}


def concept_matrix(class_names: tuple[str, ...], vocab: Vocabulary) -> torch.Tensor:
    """(classes, V) 0/1 matrix: caption word v names what class c shows (see the module doc)."""
    grounding = grounded_words()
    matrix = torch.zeros(len(class_names), len(vocab))
    for c, name in enumerate(class_names):
        for word in grounding.get(name, (head_noun(name),)):  # the shipped file lists all 1000 ImageNet labels
            if word in vocab.stoi:
                matrix[c, vocab.stoi[word]] = 1.0
    return matrix


def concept_evidence(class_probs: torch.Tensor, matrix: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, classes) probabilities -> (B, V) evidence in [0, 1], zero below ``threshold``."""
    evidence = (class_probs @ matrix.to(class_probs.device)).clamp(max=1.0)
    return evidence * (evidence >= threshold)
