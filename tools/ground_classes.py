"""Write captioner/grounding.json: which caption words name what each ImageNet class shows.

The encoder's ImageNet head speaks in 1000 fine labels ("Labrador retriever", "espresso",
"moped"); captions speak in plain words ("dog", "coffee", "scooter"). The map is built by
three rules, in order, then reviewed by hand (the review is the ``WORDS`` table below and
the printed listing, read class by class):

1. ``WORDS``: hand-written words for classes whose label says little to a caption writer
   (espresso -> coffee, cup; space shuttle -> rocket; moped -> scooter, motorcycle).
2. ``GROUPS``: ranges of class indices that share one plain word (the 118 dog breeds ->
   dog, the domestic cats -> cat, the bird species -> bird), from ImageNet's WordNet order.
3. Otherwise, the label's head noun (its last word: "tiger cat" -> cat), as before.

Every class is written with its words, whatever the vocabulary; a model keeps the words its
own vocabulary has (``--vocab`` only shapes the review listing). Run from the repository root:

    .venv/bin/python tools/ground_classes.py [--vocab captioner/default_model/vocab.json] [--list]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.concepts import GROUNDING_FILE, head_noun  # noqa: E402
from captioner.encoders import imagenet_classes  # noqa: E402
from captioner.outputs import write_atomically  # noqa: E402
from captioner.pipelines.cli import run_command  # noqa: E402
from captioner.vocab import Vocabulary  # noqa: E402

# (first label, last label, words): ranges of ImageNet classes (WordNet order) that caption writers name alike.
# Not the 118 dog breeds: Flickr8k's decoder says "dog" unprompted, and boosting it cost dev
# CIDEr-D 0.013 (it pushed out colours and plurals: "a dog" for "a black and white dog").
GROUPS: list[tuple[str, str, list[str]]] = [
    ("tench", "stingray", ["fish"]),
    ("cock", "hen", ["chicken", "bird"]),
    ("ostrich", "great grey owl", ["bird"]),
    ("bullfrog", "tailed frog", ["frog"]),
    ("African crocodile", "American alligator", ["crocodile"]),
    ("thunder snake", "sidewinder", ["snake"]),
    ("black grouse", "black swan", ["bird"]),
    ("white stork", "albatross", ["bird"]),
    ("tabby", "lynx", ["cat"]),  # domestic cats, cougar, lynx
    ("brown bear", "sloth bear", ["bear"]),
    ("tiger beetle", "lycaenid", ["insect"]),  # beetles, flies, bees, butterflies
    ("wood rabbit", "Angora", ["rabbit"]),
    ("orangutan", "squirrel monkey", ["monkey"]),
    ("Indian elephant", "African elephant", ["elephant"]),
    ("barracouta", "puffer", ["fish"]),
]

# Hand-written words per class label: what a caption writer calls the thing in the photo.
# An empty list: the label's head noun means something else in captions (a "player" is a
# person, a "watch" a verb, a "slide" a playground's), so the class grounds no word.
WORDS: dict[str, list[str]] = {
    "space bar": [], "hard disc": [], "Gila monster": [], "Madagascar cat": [], "book jacket": [],
    "entertainment center": [], "manhole cover": [], "remote control": [], "cassette player": [],
    "CD player": [], "tape player": [], "lens cap": [], "medicine chest": [], "chest": [], "ear": [],
    "pick": [], "pitcher": [], "piggy bank": [], "web site": [], "hair slide": [], "hair spray": [],
    "half track": [], "digital watch": [], "potter's wheel": [], "mobile home": [], "drilling platform": [],
    "Petri dish": [], "solar dish": [], "home theater": [],
    "black swan": ["swan", "bird"],
    "pelican": ["bird"],
    "tiger": ["tiger"],
    "sorrel": ["horse"],
    "ox": ["bull", "cow"],
    "water buffalo": ["cow"],
    "bison": ["cow"],
    "ram": ["sheep"],
    "bighorn": ["sheep"],
    "Arabian camel": ["camel"],
    "aircraft carrier": ["boat"],
    "airliner": ["plane", "airplane"],
    "airship": ["airplane", "plane"],
    "altar": ["church"],
    "ambulance": ["ambulance"],
    "amphibian": ["car"],
    "analog clock": ["clock"],
    "backpack": ["backpack", "bag"],
    "balloon": ["balloon"],
    "banjo": ["guitar"],
    "barn": ["barn"],
    "basketball": ["basketball", "ball"],
    "beach wagon": ["car"],
    "beacon": ["tower"],
    "beer bottle": ["beer", "bottle"],
    "beer glass": ["beer", "glass"],
    "boathouse": ["boat"],
    "bullet train": ["train"],
    "cab": ["car"],
    "canoe": ["canoe", "boat"],
    "car wheel": ["car"],
    "castle": ["building"],
    "catamaran": ["boat"],
    "church": ["church"],
    "cinema": ["theater", "building"],
    "coffee mug": ["cup", "mug", "coffee"],
    "computer keyboard": ["computer", "keyboard"],
    "container ship": ["ship", "boat"],
    "convertible": ["car"],
    "desktop computer": ["computer"],
    "electric locomotive": ["train"],
    "fireboat": ["boat"],
    "fire engine": ["truck"],
    "forklift": ["truck"],
    "freight car": ["train"],
    "garbage truck": ["truck"],
    "golfcart": ["cart"],
    "gondola": ["boat"],
    "greenhouse": ["greenhouse"],
    "harvester": ["tractor"],
    "horse cart": ["horse", "cart"],
    "jeep": ["jeep", "car"],
    "jinrikisha": ["cart"],
    "laptop": ["laptop", "computer"],
    "lifeboat": ["boat"],
    "limousine": ["car"],
    "liner": ["boat"],
    "minibus": ["bus"],
    "minivan": ["van", "car"],
    "Model T": ["car"],
    "monastery": ["church"],
    "moped": ["scooter", "motorcycle"],
    "mosque": ["church"],
    "motor scooter": ["scooter", "motorcycle"],
    "moving van": ["truck"],
    "palace": ["building"],
    "passenger car": ["train"],
    "pickup": ["truck"],
    "pill bottle": ["bottle"],
    "pirate": ["boat"],
    "police van": ["car"],
    "pop bottle": ["soda", "bottle"],
    "racer": ["car"],
    "recreational vehicle": ["car"],
    "school bus": ["bus"],
    "schooner": ["boat"],
    "space shuttle": ["rocket"],
    "speedboat": ["boat"],
    "sports car": ["car"],
    "steam locomotive": ["train"],
    "streetcar": ["train"],
    "stupa": ["church"],
    "submarine": ["boat"],
    "tank": ["tractor"],
    "tow truck": ["truck"],
    "trailer truck": ["truck"],
    "tricycle": ["tricycle"],
    "trimaran": ["boat"],
    "trolleybus": ["bus"],
    "unicycle": ["unicycle"],
    "warplane": ["airplane", "plane"],
    "water bottle": ["bottle"],
    "water jug": ["jar"],
    "whiskey jug": ["bottle"],
    "wine bottle": ["wine", "bottle"],
    "yawl": ["boat"],
    "plate": ["plate", "food"],
    "guacamole": ["food"],
    "consomme": ["food", "bowl"],
    "hot pot": ["food"],
    "trifle": ["food"],
    "ice cream": ["cream"],
    "ice lolly": ["food"],
    "French loaf": ["bread"],
    "bagel": ["bread"],
    "pretzel": ["bread"],
    "cheeseburger": ["food"],
    "hotdog": ["food"],
    "mashed potato": ["food"],
    "Granny Smith": ["apple", "fruit"],
    "strawberry": ["fruit"],
    "orange": ["orange", "fruit"],
    "lemon": ["fruit"],
    "fig": ["fruit"],
    "pineapple": ["fruit"],
    "banana": ["fruit"],
    "pizza": ["pizza"],
    "burrito": ["food"],
    "red wine": ["wine", "glass"],
    "espresso": ["coffee", "cup"],
    "cup": ["cup"],
    "eggnog": ["drink"],
}


def grounding(classes: tuple[str, ...]) -> list[list[str]]:
    """Words per class index, by the rules in this module's docstring, before any vocabulary."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = [label for first, last, _ in GROUPS for label in (first, last) if label not in index]
    unknown += [label for label in WORDS if label not in index]
    if unknown:
        raise SystemExit(f"not ImageNet labels: {unknown}")
    words: list[list[str] | None] = [None for _ in classes]
    for first, last, group in GROUPS:
        for i in range(index[first], index[last] + 1):
            words[i] = list(group)
    for label, chosen in WORDS.items():
        words[index[label]] = list(chosen)
    for i, label in enumerate(classes):
        if words[i] is None:
            noun = head_noun(label)
            words[i] = [noun] if noun else []
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default=str(ROOT / "captioner" / "default_model" / "vocab.json"),
                        help="list only words this vocabulary holds (a JSON list of words)")
    parser.add_argument("--list", action="store_true", help="print every class with its words, for review")
    args = parser.parse_args()
    sys.exit(run_command("ground_classes", lambda: write_grounding(args)))


def write_grounding(args: argparse.Namespace) -> None:
    classes = imagenet_classes()
    vocab = set(Vocabulary.load(args.vocab).itos)
    entries = [{"class": i, "label": label, "words": words}
               for i, (label, words) in enumerate(zip(classes, grounding(classes), strict=True))]
    if args.list:
        for entry in entries:
            kept = [w for w in entry["words"] if w in vocab]
            print(f"{entry['class']:4d} {entry['label']:35s} -> {' '.join(kept) or '-'}")
    lines = ",\n".join(json.dumps(entry) for entry in entries)  # one class per line: reviewable diffs
    write_atomically(GROUNDING_FILE, lambda f: f.write(f"[\n{lines}\n]\n"))
    grounded = sum(1 for entry in entries if any(w in vocab for w in entry["words"]))
    print(f"{GROUNDING_FILE.relative_to(ROOT)}: all {len(classes)} classes; {grounded} grounded in "
          f"{Path(args.vocab).name}'s words", file=sys.stderr)


if __name__ == "__main__":
    main()
