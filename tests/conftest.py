import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# DCP warns that it runs without a process group in single-process tests: that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenised-corpus cache for the whole session (tokenise once, as users do)."""
    return tmp_path_factory.mktemp("data-cache")
