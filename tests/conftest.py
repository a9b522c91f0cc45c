import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (Omniglot tars, Fashion-MNIST IDX files), found through FEATSTORE_DATA.

    `.ci/run` points FEATSTORE_DATA at ../shared/data when that folder exists; elsewhere these tests skip.
    """
    root = os.environ.get("FEATSTORE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("FEATSTORE_DATA is not set to a folder with the real data sets (set by .ci/run)")
    return Path(root)
