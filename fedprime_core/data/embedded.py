"""The embedded default dataset: small generated image+text classification, no downloads.

"FoodToy": 8 food classes. Every sample carries *independent, graded* evidence of its
class in each modality, so the class is recoverable from either modality alone, and
better from both together (two independent noisy looks beat one):

* **image** (64 x 64 RGB, uint8): a 4 x 4 grid of 16-px cells (ViLT's patch grid), each
  cell one of the class's 3 palette colours at a random place, scaled by a random contrast
  in ``[0.35, 1]``, plus noise per cell, a random global brightness shift and mild pixel
  noise (the class shows in colour statistics, as food photos largely do);
* **text** (6-12 lower-case words): each word is one of the class's 4 words with
  probability 0.22, a word of a random other class with probability 0.08, and a neutral
  filler word otherwise.

Samples are :class:`~fedprime_core.data.records.Sample` records exactly like the real
loaders produce (the image is an in-memory array instead of a file path), so everything
downstream (missing simulation, partitions, processing, training) is the real pipeline.
Generation is a pure function of the seed.

For backbones that read precomputed image features instead of pixels
(``backbone=text-encoder``), ``make_embedded_dataset(..., image_features=True)`` also runs
every image once through a fixed, frozen "image encoder" (:func:`encode_images`: a seeded
random 4x4/stride-4 convolution with 128 filters, ReLU, average pooling over the image or
a grid of cells) and stores the result in :attr:`Sample.image_features`. It is computed
only when asked for, so the ViLT path does not pay for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .datasets.embedded import SPEC
from .records import DatasetSplits, Sample

CLASSES = ("apple-pie", "bibimbap", "caesar-salad", "donuts", "edamame", "falafel", "gyoza", "hummus")

CLASS_WORDS = (
    ("apple", "cinnamon", "crust", "pie"),
    ("rice", "gochujang", "bowl", "bibimbap"),
    ("romaine", "croutons", "caesar", "parmesan"),
    ("donut", "glazed", "sprinkles", "frosting"),
    ("edamame", "soybeans", "pods", "salted"),
    ("falafel", "chickpea", "fritter", "tahini"),
    ("gyoza", "dumpling", "potsticker", "pleated"),
    ("hummus", "paprika", "olive", "creamy"),
)

FILLER_WORDS = (
    "a",
    "the",
    "with",
    "and",
    "on",
    "of",
    "fresh",
    "homemade",
    "recipe",
    "easy",
    "best",
    "delicious",
    "served",
    "plate",
    "quick",
    "simple",
    "classic",
    "style",
    "my",
    "our",
    "dinner",
    "lunch",
    "snack",
    "tasty",
    "photo",
    "kitchen",
    "favourite",
    "weekend",
    "family",
    "warm",
    "healthy",
    "traditional",
    "made",
    "how",
    "to",
    "make",
    "from",
    "scratch",
    "restaurant",
    "table",
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

IMAGE_SIZE = 64
TEXT_MAX_LENGTH = SPEC.text_length
_GRID = 4
_PALETTE = 3
#: The synthetic "world" (class prototypes) is fixed; the sample seed only draws samples,
#: so the tiny backbone's pretraining corpus and every dataset seed share one world.
WORLD_SEED = 0xF00D
#: Width of the generated image features, and the seed of the frozen feature encoder.
FEATURE_DIM = 128
FEATURE_SEED = 0xFEA7
_FEATURE_PATCH = 4


def vocabulary() -> list[str]:
    """BERT-style vocabulary of the embedded set: special tokens, class words, fillers."""
    words = sorted({w for group in CLASS_WORDS for w in group} | set(FILLER_WORDS))
    return list(SPECIAL_TOKENS) + words


def build_embedded_tokenizer():
    """A real ``transformers`` BERT tokenizer over :func:`vocabulary` (used by ``tiny-vilt``)."""
    from transformers import BertTokenizer

    vocab = {word: i for i, word in enumerate(vocabulary())}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def class_palettes() -> np.ndarray:
    """Class palettes ``(C, 3, 3)``: three RGB colours in ``[-1, 1]`` per class (fixed by :data:`WORLD_SEED`)."""
    return np.random.default_rng(WORLD_SEED).uniform(-1.0, 1.0, size=(len(CLASSES), _PALETTE, 3))


def generate_image(
    palette: np.ndarray,
    rng: np.random.Generator,
    contrast: tuple[float, float] = (0.35, 1.0),
    cell_noise: float = 0.5,
) -> np.ndarray:
    """One ``(64, 64, 3)`` uint8 image of the class with colour ``palette`` ``(3, 3)``.

    Each 16-px cell takes one palette colour at a random place: the class shows in the
    colour statistics (as food photos largely do), not in one layout. Ambiguity comes from
    the random ``contrast`` range, per-cell noise, a global brightness shift and mild pixel
    noise.
    """
    scale = rng.uniform(*contrast)
    cells = palette[rng.integers(_PALETTE, size=(_GRID, _GRID))] * scale
    cells = cells + rng.normal(0.0, cell_noise, size=cells.shape) + rng.normal(0.0, 0.25, size=(1, 1, 3))
    field = np.kron(cells, np.ones((IMAGE_SIZE // _GRID, IMAGE_SIZE // _GRID, 1)))
    field = field + rng.normal(0.0, 0.2, size=field.shape)
    return np.clip((field + 1.0) * 127.5, 0, 255).astype(np.uint8)


def generate_text(label: int, rng: np.random.Generator) -> str:
    words = []
    for _ in range(int(rng.integers(6, 13))):
        draw = rng.random()
        if draw < 0.22:
            words.append(CLASS_WORDS[label][rng.integers(4)])
        elif draw < 0.30:
            other = (label + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)
            words.append(CLASS_WORDS[other][rng.integers(4)])
        else:
            words.append(FILLER_WORDS[rng.integers(len(FILLER_WORDS))])
    return " ".join(words)


def feature_encoder_weights(dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """The frozen random feature encoder: filters ``(48, dim)`` over a 4x4 RGB patch, and biases ``(dim,)``."""
    rng = np.random.default_rng(FEATURE_SEED)
    inputs = _FEATURE_PATCH * _FEATURE_PATCH * 3
    weights = rng.normal(0.0, 1.0 / np.sqrt(inputs), size=(inputs, dim))
    biases = rng.normal(0.0, 0.5, size=dim)
    return weights, biases


def encode_images(images: np.ndarray, grid: int = 1, dim: int = FEATURE_DIM, batch: int = 256) -> np.ndarray:
    """Frozen features of ``(N, 64, 64, 3)`` uint8 images: ``(N, grid * grid, dim)`` float32.

    Pixels scaled to ``[-1, 1]``; every non-overlapping 4x4 patch goes through the same
    seeded random linear filters plus bias and a ReLU (a fixed random convolution); the
    16x16 map of responses is averaged over the whole image (``grid=1``, one vector per
    image, like a CLIP embedding) or over ``grid x grid`` cells (a feature grid). A pure
    function of the pixels.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {images.shape}")
    side = IMAGE_SIZE // _FEATURE_PATCH
    if grid < 1 or side % grid:
        raise ValueError(f"grid must divide {side}, got {grid}")
    weights, biases = feature_encoder_weights(dim)
    out = np.empty((len(images), grid * grid, dim), dtype=np.float32)
    cell = side // grid
    for start in range(0, len(images), batch):
        x = images[start : start + batch].astype(np.float64) / 127.5 - 1.0
        n = len(x)
        patches = x.reshape(n, side, _FEATURE_PATCH, side, _FEATURE_PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        responses = np.maximum(patches.reshape(n, side, side, -1) @ weights + biases, 0.0)
        pooled = responses.reshape(n, grid, cell, grid, cell, dim).mean(axis=(2, 4))
        out[start : start + n] = pooled.reshape(n, grid * grid, dim)
    return out


def with_image_features(samples: list[Sample], grid: int = 1) -> list[Sample]:
    """The same samples with :func:`encode_images` features of their (in-memory) images."""
    if not samples:
        return []
    features = encode_images(np.stack([s.image for s in samples]), grid=grid)
    return [dataclasses.replace(s, image_features=f) for s, f in zip(samples, features)]


def make_embedded_dataset(
    seed: int = 0, num_train: int = 2000, num_dev: int = 400, num_test: int = 800, image_features: bool = False
) -> DatasetSplits:
    """Generate the embedded dataset (balanced classes, deterministic for ``seed``).

    The seed changes the samples, never the world: classes look and read the same for
    every seed (and for the tiny backbone's pretraining corpus). With ``image_features``,
    every sample also carries its frozen image features ``(1, FEATURE_DIM)`` (see
    :func:`encode_images`); the samples are otherwise identical.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, WORLD_SEED]))
    protos = class_palettes()

    def split(name: str, count: int) -> list[Sample]:
        labels = rng.permutation(np.arange(count) % len(CLASSES))
        return [
            Sample(
                text=generate_text(int(y), rng),
                image=generate_image(protos[y], rng),
                label=int(y),
                uid=f"embedded/{name}:{i}",
            )
            for i, y in enumerate(labels)
        ]

    train, dev, test = split("train", num_train), split("dev", num_dev), split("test", num_test)
    if image_features:
        train, dev, test = with_image_features(train), with_image_features(dev), with_image_features(test)
    return DatasetSplits(
        train=train,
        dev=dev,
        test=test,
        classes=CLASSES,
        multilabel=False,
        text_max_length=TEXT_MAX_LENGTH,
        name=SPEC.name,
    )
