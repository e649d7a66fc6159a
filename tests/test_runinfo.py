"""`jmmkv.runinfo.versions` reports what is installed, and None for what is not."""

from __future__ import annotations

import platform

import jax
import numpy as np
import transformers

import jmmkv
from jmmkv import runinfo


def test_versions_are_the_installed_ones():
  v = runinfo.versions("surely-not-an-installed-distribution")
  assert v["python"] == platform.python_version()
  assert v["jmmkv"] == jmmkv.__version__
  assert v["jax"] == jax.__version__
  assert v["numpy"] == np.__version__
  assert v["transformers"] == transformers.__version__
  assert v["surely-not-an-installed-distribution"] is None
  assert set(runinfo.PACKAGES) <= set(v)
