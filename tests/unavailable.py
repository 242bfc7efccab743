"""The one rule for a test whose peer or tool is missing: skipped on a
developer's machine, a failure in CI (``CI`` set), where ``.ci/run``
installs everything the suite needs."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    if not os.environ.get("CI"):
        pytest.skip(reason)
    pytest.fail(f"must run in CI, but: {reason}")
