"""Helpers shared with the main suite: ``tests/conftest.py`` loaded under its own name (two
folders each have a ``conftest`` module, so ``import conftest`` would be ambiguous)."""

from __future__ import annotations

import importlib.util
import os
import sys

import cloudpickle

_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conftest.py")
_spec = importlib.util.spec_from_file_location("safechroma_suite_helpers", _path)
assert _spec is not None and _spec.loader is not None
_helpers = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = _helpers
    _spec.loader.exec_module(_helpers)

HashEmbedding = _helpers.HashEmbedding
child_pids = _helpers.child_pids
embed_text = _helpers.embed_text
vectors = _helpers.vectors

# The worker cannot import this module by name: functions from it travel by value.
cloudpickle.register_pickle_by_value(_helpers)
