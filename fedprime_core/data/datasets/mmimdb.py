"""MM-IMDB: plot + poster -> genres, under two protocols (docs/datasets.md).

``paper`` (the FedPrime paper and its reference code): the single-genre movies of the 8 most
frequent train genres, single-label, macro-F1. ``multilabel``: every genre, multi-hot, BCE.
Both report macro-F1 first, as the paper does.
"""

from __future__ import annotations

from .spec import DatasetSpec

PROTOCOLS = ("paper", "multilabel")

#: The 23 MM-IMDB genres in the order of the multi-hot ``label`` column written by
#: ``vilt/utils/write_mmimdb.py`` (``GENRE_CLASS`` there).
GENRES: tuple[str, ...] = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music",
    "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)  # fmt: skip

#: Genres the paper protocol keeps when ``num-classes`` is 0.
PAPER_NUM_CLASSES = 8


def single_genre(names: tuple[str, ...]) -> str | None:
    """The paper protocol's label of a movie: its one genre, or ``None`` (several genres, or none).

    Genres are counted among the 23 MM-IMDB genres (names outside them, such as 'News', are
    ignored, as the reference's multi-hot label ignores them); a row that names none of the 23
    (labelled by a class index without genre names) must hold exactly one label.
    """
    genres = [n for n in names if n in GENRES] or list(names)
    return genres[0] if len(genres) == 1 else None


SPEC = DatasetSpec(
    name="mmimdb",
    text_length=128,
    metric="macro_f1",
    multilabel=True,
    jsonl_label_fields=("label", "labels", "genres"),
    arrow_files=("mmimdb_train.arrow", "mmimdb_dev.arrow", "mmimdb_test.arrow"),
    arrow_text_column="plots",
    protocols=PROTOCOLS,
    multilabel_protocols=("multilabel",),
    single_label={"paper": single_genre},
    single_label_classes=PAPER_NUM_CLASSES,
    single_label_log="%s protocol kept %d single-genre movie(s), dropped %d with several (or no) genres",
)
