"""Generated samples whose label shows through one modality only (the other is noise).

Local training's tests (learning beats chance through either modality) and the lean and
minimal profiles' tests train on these.
"""

from __future__ import annotations

import numpy as np

from fedprime_core.data import embedded
from fedprime_core.data.records import Sample

CLASSES = 4


def one_modality_samples(modality: str, count: int, seed: int) -> list[Sample]:
    """The label shows clearly, but only through ``modality``; the other one is pure noise."""
    rng = np.random.default_rng(seed)
    protos = embedded.class_palettes()
    samples = []
    for i in range(count):
        label = int(rng.integers(CLASSES))
        if modality == "image":
            image = embedded.generate_image(protos[label], rng, contrast=(0.9, 1.0), cell_noise=0.15)
            text = " ".join(rng.choice(embedded.FILLER_WORDS, size=8))
        else:
            image = embedded.generate_image(protos[int(rng.integers(CLASSES))], rng)
            words = [*rng.choice(embedded.CLASS_WORDS[label], size=2), *rng.choice(embedded.FILLER_WORDS, size=6)]
            text = " ".join(rng.permutation(words))
        samples.append(Sample(text=text, image=image, label=label, uid=f"gen:{i}"))
    return samples
