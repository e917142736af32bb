"""Only what pyproject.toml cannot say: the start-up hook ``safechroma-run.pth``.

``safechroma run`` and ``safechroma.patch()`` reach a program's Python children through a
``.pth`` file in site-packages, which every interpreter of the environment reads at start-up
(even one whose ``PYTHONPATH`` was stripped). It acts only when ``SAFECHROMA_RUN`` is set
(``safechroma.launch.hook``). setuptools installs files outside packages neither in a wheel nor
in an editable install, so both commands add it here.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "safechroma-run.pth"
# One line, run by site.py in every interpreter: a dict lookup unless the variable is set.
PTH = (
    "import os; 'SAFECHROMA_RUN' in os.environ and __import__('safechroma.launch.hook', "
    "fromlist=['_']).install_from_environment()\n"
)


class BuildPyWithHook(build_py):
    """A wheel carries the hook at its root, which pip installs into site-packages."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
                f.write(PTH)


class _WithHook:
    """Wraps setuptools' editable strategy: its files, plus the hook."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __enter__(self) -> _WithHook:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)

    def __call__(self, wheel: Any, files: Any, mapping: Any) -> None:
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH)


class EditableWheelWithHook(editable_wheel):
    """``pip install -e .`` installs the hook too."""

    def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:
        return _WithHook(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
