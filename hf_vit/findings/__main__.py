"""``python -m hf_vit.findings RUNS_DIR [--output_dir DIR] [--export_records DIR]``: regenerate findings.md.

RUNS_DIR is a study folder (``python -m hf_vit.study``'s ``--output_dir``) or a folder of its exported run records
(docs/findings/ holds the committed CPU study's). ``--export_records DEST`` first copies the study's records into DEST
(:func:`hf_vit.findings.export_records`) and then writes DEST/findings.md from the copies.
"""

from __future__ import annotations

import argparse

from hf_vit.errors import raise_user_errors, run_cli

from .document import write_findings
from .records import export_records


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m hf_vit.findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="a study folder, or a folder of its run records")
    parser.add_argument("--output_dir", default=None, help="where findings.md and its figures go (default RUNS_DIR)")
    parser.add_argument("--export_records", default=None, metavar="DEST",
                        help="copy the runs' records (results, history, config, predictions) into DEST first, then "
                             "write DEST/findings.md from them")
    raise_user_errors(parser)
    args = parser.parse_args(argv)
    source = args.runs_dir
    if args.export_records:
        runs = export_records(args.runs_dir, args.export_records)
        print(f"[findings] exported the records of {len(runs)} runs to {args.export_records}")
        source = args.export_records
    path = write_findings(source, args.output_dir or source)
    print(f"[findings] {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
