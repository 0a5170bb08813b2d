"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# DVC must not send usage analytics from any test that runs it.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def _float32_default():
    """Keep PyTorch's default dtype at float32 even if a test changes it."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Restore PyTorch's CPU thread count after each test, because stages set it for the whole process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
