"""Findings: a study's designs judged by its finished runs, with the course report's tables regenerated from them.

:func:`write_findings` reads a study folder (or its committed run records) and writes ``findings.md`` and its
figures; :mod:`hf_vit.study` calls it after its runs, and ``python -m hf_vit.findings DIR`` regenerates it from the
records alone. One module per job:

* :mod:`~hf_vit.findings.designs` — the designs a study file states before it runs (:class:`Design`);
* :mod:`~hf_vit.findings.facts` — what each finished run folder says (:class:`RunFacts`, :func:`read_facts`);
* :mod:`~hf_vit.findings.stats` — cells of seeds, the convergence rule and the paired estimate (:func:`estimate`);
* :mod:`~hf_vit.findings.verdicts` — each design judged (:func:`judge`);
* :mod:`~hf_vit.findings.plots` — the figures;
* :mod:`~hf_vit.findings.document` — ``findings.md`` itself (:func:`write_findings`);
* :mod:`~hf_vit.findings.records` — the run records a study commits (:func:`export_records`).
"""

from .designs import Design, parse_designs
from .document import STUDY_RECORD, fraction_table, format_flops, runs_table, write_findings
from .facts import CNN_TYPES, RunFacts, read_facts
from .plots import CURVES, fraction_series, plot_accuracy_vs_fraction
from .records import RECORD_FILES, export_records
from .stats import Estimate, cells_of, converged, estimate, last_part_rise
from .verdicts import Comparison, combine, judge, verdict

__all__ = [
    "CNN_TYPES", "CURVES", "Comparison", "Design", "Estimate", "RECORD_FILES", "RunFacts", "STUDY_RECORD", "cells_of",
    "combine", "converged", "estimate", "export_records", "format_flops", "fraction_series", "fraction_table",
    "judge", "last_part_rise", "parse_designs", "plot_accuracy_vs_fraction", "read_facts", "runs_table", "verdict",
    "write_findings",
]
