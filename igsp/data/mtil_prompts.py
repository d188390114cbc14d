"""ZSCL's class names and CLIP prompt templates of the 11 MTIL datasets, as data (`igsp.data.mtil` uses them).

Source: ZSCL `mtil/src/datasets/collections.py` and `cifar10.py` (https://github.com/Thunderbeee/ZSCL, the same
files in MoE-Adapters4CL `mtil/src/datasets/`). Both codebases evaluate with every template of a dataset (class
embedding = the mean of its normalised prompt embeddings) and train with the first one (`dataset.template`), so
the order of each tuple matters and is theirs. Everything here is copied verbatim, including ZSCL's quirks:
"a embroidered {}." and "a origami {}." (Caltech101), the double space in Caltech101's "head of a  crocodile",
and CLIP's "water lilly" spelling. tests/data/test_data_mtil.py pins the counts, the first templates and these
quirks.

Class-name rules (`zscl_classnames`), applied to torchvision's class list of each dataset:
- Caltech101 and EuroSAT: ZSCL's hand-written lists, indexed by torchvision's sorted folder order; kept here as
  folder -> name tables so a partial copy (fewer folders) still gets the right names.
- Flowers102: ZSCL's list by label index (torchvision's own list differs in one name: "pink-yellow dahlia?").
- every other dataset: torchvision's class names with "_" turned into " " (ZSCL's `underline_to_space`, nothing
  else): MNIST "0 - zero" ... "9 - nine", SUN397 "apartment building/outdoor", Food-101 "apple pie".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "CALTECH101_CLASSNAMES",
    "EUROSAT_CLASSNAMES",
    "FLOWERS102_CLASSNAMES",
    "ZSCL_TEMPLATES",
    "underline_to_space",
    "zscl_classnames",
]

ZSCL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "aircraft": (
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ),
    "caltech101": (
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ),
    "cifar100": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a black and white photo of a {}.",
        "a low contrast photo of a {}.",
        "a high contrast photo of a {}.",
        "a bad photo of a {}.",
        "a good photo of a {}.",
        "a photo of a small {}.",
        "a photo of a big {}.",
        "a photo of the {}.",
        "a blurry photo of the {}.",
        "a black and white photo of the {}.",
        "a low contrast photo of the {}.",
        "a high contrast photo of the {}.",
        "a bad photo of the {}.",
        "a good photo of the {}.",
        "a photo of the small {}.",
        "a photo of the big {}.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
    "eurosat": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "flowers": (
        "a photo of a {}, a type of flower.",
    ),
    "food": (
        "a photo of a {}, a type of food.",
    ),
    "mnist": (
        'a photo of the number: "{}".',
    ),
    "oxford_pet": (
        "a photo of a {}, a type of pet.",
    ),
    "cars": (
        "a photo of a {}, a type of car.",
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}.",
    ),
}

CALTECH101_CLASSNAMES: dict[str, str] = {
    "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard", "Motorbikes": "motorbike",
    "accordion": "accordion", "airplanes": "airplane", "anchor": "anchor", "ant": "ant", "barrel": "barrel",
    "bass": "bass", "beaver": "beaver", "binocular": "binocular", "bonsai": "bonsai", "brain": "brain",
    "brontosaurus": "brontosaurus", "buddha": "buddha", "butterfly": "butterfly", "camera": "camera",
    "cannon": "cannon", "car_side": "side of a car", "ceiling_fan": "ceiling fan", "cellphone": "cellphone",
    "chair": "chair", "chandelier": "chandelier", "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat", "crab": "crab", "crayfish": "crayfish", "crocodile": "crocodile",
    "crocodile_head": "head of a  crocodile", "cup": "cup", "dalmatian": "dalmatian", "dollar_bill": "dollar bill",
    "dolphin": "dolphin", "dragonfly": "dragonfly", "electric_guitar": "electric guitar", "elephant": "elephant",
    "emu": "emu", "euphonium": "euphonium", "ewer": "ewer", "ferry": "ferry", "flamingo": "flamingo",
    "flamingo_head": "head of a flamingo", "garfield": "garfield", "gerenuk": "gerenuk", "gramophone": "gramophone",
    "grand_piano": "grand piano", "hawksbill": "hawksbill", "headphone": "headphone", "hedgehog": "hedgehog",
    "helicopter": "helicopter", "ibis": "ibis", "inline_skate": "inline skate", "joshua_tree": "joshua tree",
    "kangaroo": "kangaroo", "ketch": "ketch", "lamp": "lamp", "laptop": "laptop", "llama": "llama",
    "lobster": "lobster", "lotus": "lotus", "mandolin": "mandolin", "mayfly": "mayfly", "menorah": "menorah",
    "metronome": "metronome", "minaret": "minaret", "nautilus": "nautilus", "octopus": "octopus", "okapi": "okapi",
    "pagoda": "pagoda", "panda": "panda", "pigeon": "pigeon", "pizza": "pizza", "platypus": "platypus",
    "pyramid": "pyramid", "revolver": "revolver", "rhino": "rhino", "rooster": "rooster", "saxophone": "saxophone",
    "schooner": "schooner", "scissors": "scissors", "scorpion": "scorpion", "sea_horse": "sea horse",
    "snoopy": "snoopy (cartoon beagle)", "soccer_ball": "soccer ball", "stapler": "stapler", "starfish": "starfish",
    "stegosaurus": "stegosaurus", "stop_sign": "stop sign", "strawberry": "strawberry", "sunflower": "sunflower",
    "tick": "tick", "trilobite": "trilobite", "umbrella": "umbrella", "watch": "watch", "water_lilly": "water lilly",
    "wheelchair": "wheelchair", "wild_cat": "wild cat", "windsor_chair": "windsor chair", "wrench": "wrench",
    "yin_yang": "yin and yang symbol",
}
EUROSAT_CLASSNAMES: dict[str, str] = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}
FLOWERS102_CLASSNAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)


def underline_to_space(name: str) -> str:
    """ZSCL's only generic class-name rule: every "_" becomes " " (slashes, case and spacing are kept)."""
    return name.replace("_", " ")


def _from_table(dataset: str, raw: Sequence[str], table: dict[str, str]) -> list[str]:
    unknown = [c for c in raw if c not in table]
    if unknown:
        # ZSCL indexes its list by position, which would shift every later name on a non-standard copy; a
        # folder outside the table gets the generic rule instead, loudly.
        logger.warning("%s: folder(s) %s are not in the dataset's class list; named by the generic rule",
                       dataset, unknown[:5])
    return [table.get(c, underline_to_space(c)) for c in raw]


def zscl_classnames(dataset: str, raw: Sequence[str]) -> list[str]:
    """ZSCL's class names for `dataset` (an `igsp.data.mtil.MTIL_DATASETS` key) from torchvision's list `raw`.

    `raw` is the torchvision dataset's class list in label order (`categories` for Caltech101, folder names for
    EuroSAT); the result has the same length and order.
    """
    if dataset == "caltech101":
        return _from_table(dataset, raw, CALTECH101_CLASSNAMES)
    if dataset == "eurosat":
        return _from_table(dataset, raw, EUROSAT_CLASSNAMES)
    if dataset == "flowers":
        if len(raw) > len(FLOWERS102_CLASSNAMES):
            raise ValueError(f"flowers: torchvision lists {len(raw)} classes, ZSCL's list has "
                             f"{len(FLOWERS102_CLASSNAMES)}")
        return list(FLOWERS102_CLASSNAMES[:len(raw)])
    return [underline_to_space(c) for c in raw]
