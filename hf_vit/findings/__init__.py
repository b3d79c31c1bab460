"""Findings: the course report's tables regenerated from finished runs, each of its findings judged by the numbers.

:func:`write_findings` reads every run folder and writes ``findings.md`` and its figures; :mod:`hf_vit.study` calls it
after its runs. One module per job; every name is imported from ``hf_vit.findings`` itself, as before the split:

* :mod:`~hf_vit.findings.facts` — what each finished run folder says (:class:`RunFacts`, :func:`read_facts`) and the
  rules for choosing and showing runs;
* :mod:`~hf_vit.findings.verdicts` — the four findings, each judged by its differences and their standard errors
  (:func:`verdict`, :class:`Comparison`, :data:`FINDINGS`);
* :mod:`~hf_vit.findings.plots` — the figures (:func:`plot_accuracy_vs_fraction`, the learning curves, the attention
  rollouts);
* :mod:`~hf_vit.findings.document` — the markdown tables and ``findings.md`` itself (:func:`write_findings`).
"""

from .document import NEWLINE, fraction_table, gap_table, format_flops, pretraining_table, runs_table, write_findings
from .facts import CNN_TYPES, RunFacts, read_facts
from .plots import CURVES, fraction_series, plot_accuracy_vs_fraction
from .verdicts import (FINDINGS, Z, Comparison, cnn_vs_vit, combine, data_dependence, format_difference,
                       generalisation_gap, pretraining_gain, pretraining_pairs, verdict)

__all__ = [
    "CNN_TYPES", "CURVES", "Comparison", "FINDINGS", "NEWLINE", "RunFacts", "Z", "cnn_vs_vit", "combine",
    "data_dependence", "format_difference", "format_flops", "fraction_series", "fraction_table", "gap_table",
    "generalisation_gap", "plot_accuracy_vs_fraction", "pretraining_gain", "pretraining_pairs", "pretraining_table",
    "read_facts", "runs_table", "verdict", "write_findings",
]
