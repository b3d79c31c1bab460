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

Names are imported on first use (PEP 562): loading a study file needs only :mod:`~hf_vit.findings.designs`, and
``import hf_vit.findings.designs`` runs this file first, so importing the figures and statistics here (matplotlib,
scipy, :mod:`hf_vit.report`) would cost every study command several seconds of start-up.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Design": "designs", "parse_designs": "designs",
    "STUDY_RECORD": "document", "fraction_table": "document", "format_flops": "document", "runs_table": "document",
    "write_findings": "document",
    "CNN_TYPES": "facts", "RunFacts": "facts", "read_facts": "facts",
    "CURVES": "plots", "fraction_series": "plots", "plot_accuracy_vs_fraction": "plots",
    "RECORD_FILES": "records", "export_records": "records",
    "Estimate": "stats", "cells_of": "stats", "converged": "stats", "estimate": "stats", "last_part_rise": "stats",
    "Comparison": "verdicts", "combine": "verdicts", "judge": "verdicts", "verdict": "verdicts",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
