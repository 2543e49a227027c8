"""The label-space protocol: one label space from the train split, reused for dev and test.

The reference code recomputes MM-IMDB's top-8 genres per split, so the same index can mean a
different genre in train and test; :func:`label_space` is computed once, from train only, and
:func:`apply_labels` maps every split's class names through it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence

from .datasets import DatasetSpec
from .records import DataError, Sample
from .rows import RawRow

logger = logging.getLogger("fedprime_core.data.loaders")  # the loaders' one logger: the lines users filter on


def label_space(train: Sequence[RawRow], num_classes: int, dataset: str) -> tuple[str, ...]:
    """Class names by decreasing train frequency (ties by name), the top ``num_classes`` if > 0."""
    counts = Counter(n for r in train for n in r.names)
    order = sorted(counts, key=lambda c: (-counts[c], c))
    if num_classes > 0:
        if num_classes > len(order):
            logger.warning(
                "%s: num_classes=%d but train has only %d classes; keeping all of them",
                dataset,
                num_classes,
                len(order),
            )
        order = order[:num_classes]
    return tuple(order)


def single_label(raws: Sequence[RawRow], split: str, spec: DatasetSpec, protocol: str) -> list[RawRow]:
    """The rows a single-label protocol keeps (MM-IMDB paper: the single-genre movies), labelled by their one class."""
    label_of = spec.single_label[protocol]
    kept: list[RawRow] = []
    for r in raws:
        label = label_of(r.names)
        if label is not None:
            kept.append(dataclasses.replace(r, names=(label,)))
    logger.info(f"%s %s: {spec.single_label_log}", spec.name, split, protocol, len(kept), len(raws) - len(kept))
    return kept


def apply_labels(
    raws: Sequence[RawRow],
    index: dict[str, int],
    seen_in_train: set[str],
    spec: DatasetSpec,
    split: str,
    multilabel: bool,
    strict: bool,
    source: str,
    skip: bool,
) -> tuple[list[Sample], list[str]]:
    """Samples with class indices, and the reasons of rows skipped as bad.

    Rows without a kept class are dropped (and counted in a log line); with ``strict`` (a
    single-label dataset with a given class list) such a row is a bad row instead: an
    error naming it, or skipped with ``skip``.
    """
    samples: list[Sample] = []
    bad: list[str] = []
    dropped = unseen = restricted = 0
    for r in raws:
        kept = sorted(index[n] for n in r.names if n in index)
        if not kept:
            if strict:
                reason = (
                    f"{r.where or r.uid}: class {r.names[0]!r} is not in {source}; add it to the class list "
                    "(the same list at every site and the server) or remove the row"
                )
                if not skip:
                    raise DataError(reason)
                bad.append(reason)
                continue
            dropped += 1
            unseen += any(n not in seen_in_train for n in r.names)
            continue
        if multilabel:
            restricted += len(kept) < len(r.names)
            label: int | tuple[int, ...] = tuple(kept)
        else:
            label = kept[0]
        samples.append(Sample(text=r.text, image=r.image, label=label, uid=r.uid, image_features=r.image_features))
    extra = f"; labels restricted to the kept classes on {restricted}" if multilabel else ""
    # Details for a DEBUG log; a filter that dropped rows is news.
    logger.log(
        logging.INFO if dropped else logging.DEBUG,
        "%s %s: kept %d sample(s), dropped %d by the class filter (%d with a class absent from train)%s",
        *(spec.name, split, len(samples), dropped, unseen, extra),
    )
    return samples, bad
