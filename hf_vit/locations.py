"""Where a name given on the command line points: a local path or a Hugging Face Hub id.

The one rule, shared by the data stage (``--dataset_name``), the model loader (``--model_name_or_path``) and the
resume and push paths (a ``user/name`` checkpoint on the Hub). A name is classified once, where it enters a stage
(:class:`hf_vit.data.sources.DataSource` holds the answer for the dataset), and the stage uses the answer from then on.
"""

from __future__ import annotations

import os


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a filesystem path rather than a Hub id (``user/name``): it exists, starts like a path, or
    has more than one slash."""
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1


def local_path(name: str) -> str | None:
    """``name`` as a local path (``~`` expanded) when it means one (:func:`is_local_path`), else None (a Hub id)."""
    return os.path.expanduser(name) if is_local_path(name) else None
