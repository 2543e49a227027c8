"""The project's own benchmark (docs/datasets/fashion.md): product name + photograph -> article type.

Built by :mod:`fedprime_core.tools.build_fashion` in the jsonl layout; read as Food-101 is.
"""

from .spec import DatasetSpec

SPEC = DatasetSpec(
    name="fashion",
    text_length=32,
    arrow_files=("fashion_train.arrow", "fashion_dev.arrow", "fashion_test.arrow"),
)
