"""tritonep: expert-parallel MoE communication in Triton, API-compatible with DeepEP V2."""
from .buffer import ElasticBuffer, topk_idx_t
from .config import Config
from .domains import get_logical_domain_size, get_physical_domain_size
from .errors import CommTimeoutError
from .handle import EPHandle, EventOverlap

__version__ = "0.1.0"
__all__ = ["ElasticBuffer", "EPHandle", "EventOverlap", "Config", "topk_idx_t", "CommTimeoutError",
           "get_physical_domain_size", "get_logical_domain_size", "__version__"]
