"""``name=value,...`` settings of a symmetric backend (the ones the benchmark's variants switch),
set by the GPU tests (``TRITONEP_TEST_SETTINGS``) and ``benchmarks/profile_ep.py --settings``."""
from __future__ import annotations

import ast
import re


def apply_settings(backend, text: str) -> None:
    """Set each ``name=value`` of ``text`` (values as Python literals, tuples included: items split
    only at a comma that a ``name=`` follows) on ``backend``; raises ValueError for a name the
    backend does not have."""
    items = re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text.strip(" ,"))
    for item in filter(None, (part.strip() for part in items)):
        name, value = (v.strip() for v in item.split("=", 1))
        if not hasattr(backend, name):
            raise ValueError(f"settings: the symmetric backend has no setting {name!r}")
        setattr(backend, name, ast.literal_eval(value))
