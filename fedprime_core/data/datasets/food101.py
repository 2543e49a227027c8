"""UPMC Food-101: recipe text + photograph -> one of 101 dishes (docs/datasets.md)."""

from .spec import DatasetSpec

SPEC = DatasetSpec(
    name="food101",
    text_length=40,
    arrow_files=("food101_train.arrow", "food101_val.arrow", "food101_test.arrow"),
)
