"""tritonep: expert-parallel MoE communication in Triton, API-compatible with DeepEP V2 (``ElasticBuffer``)
and its legacy V1 ``Buffer``."""
from .buffer import ElasticBuffer, topk_idx_t
from .config import KernelConfig
from .domains import get_logical_domain_size, get_physical_domain_size
from .errors import CommTimeoutError, RecvOverflowError
from .handle import EPHandle, EventOverlap
from .legacy import Buffer, Config
from .sizing import recv_capacity

__version__ = "0.1.0"
__all__ = ["ElasticBuffer", "EPHandle", "EventOverlap", "Buffer", "Config", "KernelConfig", "topk_idx_t", "CommTimeoutError",
           "RecvOverflowError", "recv_capacity", "get_physical_domain_size", "get_logical_domain_size", "__version__"]
