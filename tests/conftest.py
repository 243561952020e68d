"""Shared fixtures. Helper functions live in importable modules (layer_helpers, gradcheck)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1701)
