"""Classifier-guided decoding: words the encoder's own ImageNet head is sure it sees.

A caption corpus as small as Flickr8k has few cats, cups or rockets, so its decoder's
language prior drowns them ("a small dog is playing"). The encoder's classifier, trained
on 1.2 M ImageNet photos, knows better. Each class label names its object by its last
word, the head noun of an English compound ("Egyptian cat" -> cat, "coffee mug" -> mug,
"mountain bike" -> bike); a caption word's *evidence* for an image is the summed
probability of the classes whose head noun it is. During search, a word with evidence at or above a threshold gets
``boost * evidence`` added to its log-probability until the hypothesis has used it once
(in the spirit of tag-guided decoding, Anderson et al., EMNLP 2017).
"""

from __future__ import annotations

import torch

from captioner.vocab import Vocabulary, tokenize


def head_noun(label: str) -> str | None:
    """Last word of a class label, lowercased ("tiger cat" -> "cat")."""
    words = tokenize(label)
    return words[-1] if words else None


def concept_matrix(class_names: tuple[str, ...], vocab: Vocabulary) -> torch.Tensor:
    """(classes, V) 0/1 matrix: caption word v is the head noun of class c's label."""
    matrix = torch.zeros(len(class_names), len(vocab))
    for c, name in enumerate(class_names):
        word = head_noun(name)
        if word in vocab.stoi:
            matrix[c, vocab.stoi[word]] = 1.0
    return matrix


def concept_evidence(class_probs: torch.Tensor, matrix: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, classes) probabilities -> (B, V) evidence in [0, 1], zero below ``threshold``."""
    evidence = (class_probs @ matrix.to(class_probs.device)).clamp(max=1.0)
    return evidence * (evidence >= threshold)
