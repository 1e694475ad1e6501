"""The paper's experiments (Keren, Sabato & Schuller, ICDM 2018, Section VI): ``logitsep reproduce`` and
``logitsep summarize``.

* :mod:`.grid`: :class:`Grid` (what is trained) and :func:`run_losses` (the learning rate of each loss chosen by
  validation accuracy; worker processes with ``jobs``);
* :mod:`.tables`: Table I, Table II and the alignment table, their JSON/CSV/markdown and figures;
* :mod:`.report`: the paper's layout (1 − metric, the mean relative improvement row) and the plots;
* :mod:`.seeds`: Table II over seeds (mean ± sd); :mod:`.paper`: the paper's numbers.
"""

from .grid import Grid, run_losses
from .paper import PAPER_IMPROVEMENT, PAPER_LOSSES, PAPER_TABLE1, PAPER_TABLE2
from .tables import (
    measured_alignment,
    reproduce_alignment,
    reproduce_command,
    reproduce_table1,
    reproduce_table2,
    reusable_runs,
    table2_rows,
    table2_summary,
    write_report,
    write_table1,
)

__all__ = ["PAPER_IMPROVEMENT", "PAPER_LOSSES", "PAPER_TABLE1", "PAPER_TABLE2", "Grid", "measured_alignment",
           "reproduce_alignment", "reproduce_command", "reproduce_table1", "reproduce_table2", "reusable_runs",
           "run_losses", "table2_rows", "table2_summary", "write_report", "write_table1"]
