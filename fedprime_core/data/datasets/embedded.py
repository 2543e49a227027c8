"""The generated embedded dataset (:mod:`fedprime_core.data.embedded`): 8 food classes, made from the seed."""

from .spec import DatasetSpec

SPEC = DatasetSpec(name="embedded", text_length=24, generated=True)
