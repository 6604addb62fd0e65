import os

import pytest
import torch

#: ``TRITONEP_TEST_SHARED_GPU=1``: the GPU tests run their ranks as processes sharing GPU 0 (one-GPU
#: machines; correctness only, see tritonep/heap/ipc.py)
SHARED_GPU = os.environ.get("TRITONEP_TEST_SHARED_GPU", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and (torch.cuda.device_count() >= 2 or SHARED_GPU):
        return
    skip = pytest.mark.skip(reason="needs 2 or more CUDA GPUs (or one with TRITONEP_TEST_SHARED_GPU=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
