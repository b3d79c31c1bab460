"""Test-only write auditor, loaded into every process of a launch by putting this folder on PYTHONPATH.

With ``HF_VIT_AUDIT_ROOT`` (a folder) and ``HF_VIT_AUDIT_LOG`` (another folder) set, every Python-level write under
the root — ``open`` for writing, ``mkdir``, ``rename``/``replace``, ``remove``, ``rmtree`` — is appended as one line to
``HF_VIT_AUDIT_LOG/rank<RANK>.jsonl`` with the process id and a timestamp, so a test can tell which rank wrote what.
Native writers that bypass Python's audit events (safetensors' Rust writer) are not seen; tests pair this log with a
listing of the output folder.

``HF_VIT_AUDIT_DELAY_RANK1=<seconds>`` additionally makes rank 1 sleep when it first creates each
``checkpoint-N.tmp`` folder (``accelerator.save_state`` does, right before writing ``random_states_1.pkl``): it turns
the race "the main process finalises checkpoint-N.tmp before the other ranks have finished writing into it" from a
matter of luck (milliseconds on a local disk) into a deterministic failure.
"""

import fnmatch
import json
import os
import sys
import time

_ROOT = os.environ.get("HF_VIT_AUDIT_ROOT")
_LOG = os.environ.get("HF_VIT_AUDIT_LOG")
_DELAY = float(os.environ.get("HF_VIT_AUDIT_DELAY_RANK1", "0"))
_RANK = os.environ.get("RANK", "0")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_DELAYED = set()
_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}


def _path(value):
    if isinstance(value, int) or value is None:
        return None
    try:
        return os.path.abspath(os.fsdecode(value))
    except TypeError:
        return None


def _is_write(event, args):
    if event != "open":
        return True
    mode, flags = args[1], args[2]
    return bool((isinstance(mode, str) and any(c in mode for c in "wax+"))
                or (isinstance(flags, int) and flags & _WRITE_FLAGS))


def _hook(event, args):
    if event not in _EVENTS:
        return
    paths = [p for p in (_path(args[0]), _path(args[1]) if event == "os.rename" else None) if p]
    inside = [p for p in paths if p == _ROOT or p.startswith(_ROOT + os.sep)]
    if not inside or not _is_write(event, args):
        return
    if (_DELAY and _RANK == "1" and event == "os.mkdir" and paths[0] not in _DELAYED
            and fnmatch.fnmatch(os.path.basename(paths[0]), "checkpoint-*.tmp")):
        _DELAYED.add(paths[0])
        time.sleep(_DELAY)
    record = {"rank": int(_RANK), "pid": os.getpid(), "t": time.time(), "event": event,
              "paths": [os.path.relpath(p, _ROOT) for p in paths]}
    with open(os.path.join(_LOG, f"rank{_RANK}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if _ROOT and _LOG:
    _ROOT = os.path.abspath(_ROOT)
    os.makedirs(_LOG, exist_ok=True)
    sys.addaudithook(_hook)
