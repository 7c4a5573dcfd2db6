"""Shared fixtures."""
import os

import pytest


def _torchvision():
    """torchvision, or a skip where it is absent; with ASYMLIB_REQUIRE_TORCHVISION=1 (CI) a failure."""
    try:
        import torchvision
        return torchvision
    except Exception as e:   # ImportError, or a torchvision built for another torch
        if os.environ.get("ASYMLIB_REQUIRE_TORCHVISION"):
            raise RuntimeError(f"ASYMLIB_REQUIRE_TORCHVISION is set but torchvision does not import: {e}; "
                               f"install the matched pair of the README (make setup)") from e
        pytest.skip(f"needs torchvision ({e})")


@pytest.fixture
def torchvision():
    return _torchvision()
