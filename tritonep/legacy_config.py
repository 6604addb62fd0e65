"""DeepEP V1's ``Config`` (its chunk sizes, checked as V1 checks them, and its buffer size hints)
and V1's tuned configurations by group size, for :class:`tritonep.Buffer`."""
from __future__ import annotations

from . import sizing

#: tokens per rank that :meth:`Config.get_nvl_buffer_size_hint` makes room for
HINT_TOKENS = 4096
#: DeepEP's tuned configurations by group size: (nvl send, nvl recv, rdma send, rdma recv)
DISPATCH_CONFIGS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
                    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
                    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
COMBINE_CONFIGS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
                   24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
                   96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


class Config:
    """DeepEP V1's performance config (``deep_ep.Config``): checked as V1 checks it and kept.
    tritonep's kernels take no chunk sizes; their choices are :class:`tritonep.KernelConfig`."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        nvl_send, nvl_recv = num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens
        rdma_send, rdma_recv = num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens
        if num_sms < 0:
            raise ValueError(f"Config: num_sms ({num_sms}) must be >= 0")
        if not 0 < nvl_send < nvl_recv:
            raise ValueError(f"Config: NVLink chunks need 0 < send ({nvl_send}) < recv ({nvl_recv})")
        if rdma_send <= 0 or rdma_recv <= 0:
            raise ValueError(f"Config: RDMA chunks ({rdma_send}, {rdma_recv}) must be > 0")
        rdma_recv = -(-rdma_recv // rdma_send) * rdma_send  # V1 rounds the receive queue up
        if not (rdma_send < rdma_recv and 2 * rdma_send <= rdma_recv):
            raise ValueError(f"Config: RDMA send chunk ({rdma_send}) must be at most half the receive queue "
                             f"({rdma_recv})")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens = nvl_send, nvl_recv
        self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens = rdma_send, rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_nvl_bytes`` for rows of ``hidden_bytes`` (``hidden * element size``):
        enough for :data:`HINT_TOKENS` tokens per rank with up to 32 experts per token and a scale
        per 128 bytes, or DeepEP's figure for its ring (up to 128 of each), whichever is larger."""
        k, scales = 32, hidden_bytes // 128
        tokens = max(sizing.dispatch_bytes(num_ranks, HINT_TOKENS, hidden_bytes, scales, k),
                     sizing.combine_bytes(num_ranks, HINT_TOKENS, max(hidden_bytes // 2, 1), k))
        channels, nvl = self.num_sms // 2, min(num_ranks, 8)
        ring = channels * nvl * (2 * max(num_ranks // 8, 1) + 3) * 4
        ring += channels * nvl * self.num_max_nvl_chunked_recv_tokens * (hidden_bytes + 8 + 128 * (8 + 4 + 4))
        return max(-(-tokens // 128) * 128, -(-ring // 128) * 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: tritonep's V1 ``Buffer`` uses no RDMA buffer."""
        return 0
