"""What every dataset module declares: :class:`DatasetSpec`, and the layouts it may be stored in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: On-disk layouts: MMBT-style jsonl, missing-aware-prompts arrow, or detect which one a folder holds.
DATA_LAYOUTS = ("auto", "jsonl", "arrow")
#: Splits a dataset folder may hold, and their file names in the jsonl layout (the same for every dataset).
SPLITS: tuple[str, ...] = ("train", "dev", "test")
JSONL_FILES: tuple[str, str, str] = ("train.jsonl", "dev.jsonl", "test.jsonl")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The facts of one dataset.

    Attributes:
        name: the ``dataset`` config value.
        text_length: tokens per text when ``text-max-length`` is 0.
        generated: built in memory from the run seed (``fedprime_core.data.embedded``), not
            read from a data folder.
        metric: the headline metric results report first: ``"accuracy"`` or ``"macro_f1"``.
        multilabel: a row may name several classes (labels are lists in the data).
        jsonl_label_fields: the fields of a jsonl row that may hold its label(s), in order.
        arrow_files: train, dev and test file names in the arrow layout.
        arrow_text_column: the arrow column that holds the text.
        protocols: the task protocols (``mmimdb-protocol``); empty: one task.
        multilabel_protocols: the protocols under which the labels are multi-hot (BCE).
        single_label: for each protocol that keeps single-label rows only: a row's one label
            from its names, or ``None`` to drop the row.
        single_label_classes: the classes such a protocol keeps when ``num-classes`` is 0.
        single_label_log: the log line of that filter (``%d`` kept, ``%d`` dropped).
    """

    name: str
    text_length: int
    generated: bool = False
    metric: str = "accuracy"
    multilabel: bool = False
    jsonl_label_fields: tuple[str, ...] = ("label",)
    arrow_files: tuple[str, str, str] = ("", "", "")
    arrow_text_column: str = "text"
    protocols: tuple[str, ...] = ()
    multilabel_protocols: tuple[str, ...] = ()
    single_label: dict[str, Callable[[tuple[str, ...]], str | None]] = dataclasses.field(default_factory=dict)
    single_label_classes: int = 0
    single_label_log: str = "%s protocol kept %d single-label row(s), dropped %d with several (or no) labels"

    def is_multilabel(self, protocol: str) -> bool:
        """Whether training sees multi-hot labels under ``protocol``."""
        return self.multilabel and protocol in self.multilabel_protocols

    def split_files(self, layout: str) -> dict[str, str]:
        """File name of each split in ``layout`` (``"jsonl"`` or ``"arrow"``)."""
        files = JSONL_FILES if layout == "jsonl" else self.arrow_files
        return dict(zip(SPLITS, files, strict=True))
