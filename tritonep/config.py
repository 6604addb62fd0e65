"""``KernelConfig``: every kernel choice of the symmetric backend in one frozen object.

``ElasticBuffer(..., config=None)`` takes one. A field left ``None`` takes the default for the
buffer's group from :data:`DEFAULTS` (by rank count), so ``KernelConfig(copy_engine_min_bytes=-1)``
changes one choice and keeps the rest; ``buffer.config`` is the resolved object, and
``dataclasses.replace(buffer.config, ...)`` gives a variant to build another buffer with. Every rank
of a group must pass equal configs: each rank's kernels read the layouts its peers write.

Where each default comes from (the measurement, by docs/benchmarks.md section and commit) is in
docs/configuration.md; a test keeps that table, :data:`DEFAULTS` and the fields in step.
"""
from __future__ import annotations

import dataclasses

Tile = tuple


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    #: (tokens, 4-byte words, warps) per step of the dispatch push. Tokens: a power of two >= 16
    #: (a fresh push reads the layout kernel's blocks of 16 tokens).
    dispatch_push_tile: Tile | None = None
    #: (tokens, 4-byte words, warps) per step of the dispatch's copy-out from the receive area.
    dispatch_copy_out_tile: Tile | None = None
    #: (rows, 4-byte words, warps) per step of the combine's SM push into the peers' combine slots
    #: (the pipelined and the two-launch combine).
    combine_push_tile: Tile | None = None
    #: (tokens, channels, warps) per step of those combines' reduction; ``(16, 0, 8)``: 0 channels
    #: means ``kernels.combine.reduce_channels(num_ranks, num_topk)``.
    combine_reduce_tile: Tile | None = None
    #: (rows, 4-byte words) per step of the SMs that send into the dense combine layout (rows by
    #: sender) when the copy engine does not; they load each step's next words ahead.
    combine_dense_send_tile: Tile | None = None
    #: (tokens, channels, warps) per step of the dense combine's reduction (tokens <= 64); 0
    #: channels: a quarter of ``reduce_channels``.
    combine_dense_reduce_tile: Tile | None = None
    #: share of a launch's programs that send when one launch both sends and reduces (the pipelined
    #: combine; the dense combine with SM senders).
    sender_share: float | None = None
    #: the copy engine moves rows (0 SMs) when there are at least this many bytes: a synced
    #: dispatch's (or its cached dispatches') received rows out of the receive area, and the
    #: combine's rows back when ``combine_by_copy_engine`` and a rank may send
    #: ``(num_ranks - 1) * num_max_tokens_per_rank * hidden * 2`` bytes or more. ``-1``: never.
    copy_engine_min_bytes: int | None = None
    #: the combine of plain rows sends with the copy engine (ranks whose dispatch synced; the others
    #: send with half of their SMs into the same dense layout). False: SMs send into the dense layout.
    combine_by_copy_engine: bool | None = None
    #: rows per copy of the copy-engine combine, a multiple of 64; 0: about an eighth of
    #: ``num_max_tokens_per_rank``, at least 256.
    copy_engine_chunk_rows: int | None = None

    def resolve(self, num_ranks: int) -> "KernelConfig":
        """This config with every ``None`` field set from :data:`DEFAULTS` for ``num_ranks`` ranks;
        raises ``ValueError`` for a value the kernels cannot take."""
        row = defaults_for(num_ranks)
        out = dataclasses.replace(row, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                          if getattr(self, f.name) is not None})
        out.validate()
        return out

    def validate(self) -> None:
        def tile(name, parts, *, tokens_pow2=False):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or len(value) != parts
                    or not all(isinstance(v, int) and v >= 0 for v in value)):
                raise ValueError(f"KernelConfig.{name}={value!r}: expected a tuple of {parts} non-negative ints")
            if value[0] <= 0 or value[0] & (value[0] - 1) or (tokens_pow2 and value[0] < 16):
                raise ValueError(f"KernelConfig.{name}={value!r}: the first entry must be a power of two"
                                 + (" >= 16" if tokens_pow2 else ""))
            if parts == 3 and value[2] not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"KernelConfig.{name}={value!r}: warps must be 1, 2, 4, 8, 16 or 32")
            if value[1] & (value[1] - 1):
                raise ValueError(f"KernelConfig.{name}={value!r}: the second entry must be a power of two (or 0 where "
                                 "it means the default)")

        tile("dispatch_push_tile", 3, tokens_pow2=True)
        tile("dispatch_copy_out_tile", 3)
        tile("combine_push_tile", 3)
        tile("combine_reduce_tile", 3)
        tile("combine_dense_send_tile", 2)
        tile("combine_dense_reduce_tile", 3)
        if self.combine_dense_reduce_tile[0] > 64:
            raise ValueError(f"KernelConfig.combine_dense_reduce_tile={self.combine_dense_reduce_tile!r}: at most 64 "
                             "tokens (one flag block)")
        if self.combine_reduce_tile[0] > self.combine_push_tile[0]:
            raise ValueError("KernelConfig.combine_reduce_tile: its tokens must not exceed combine_push_tile's rows")
        if not isinstance(self.sender_share, float) or not 0 < self.sender_share < 1:
            raise ValueError(f"KernelConfig.sender_share={self.sender_share!r}: expected a float in (0, 1)")
        if not isinstance(self.copy_engine_min_bytes, int) or self.copy_engine_min_bytes < -1:
            raise ValueError(f"KernelConfig.copy_engine_min_bytes={self.copy_engine_min_bytes!r}: expected an int >= -1")
        if not isinstance(self.combine_by_copy_engine, bool):
            raise ValueError(f"KernelConfig.combine_by_copy_engine={self.combine_by_copy_engine!r}: expected a bool")
        rows = self.copy_engine_chunk_rows
        if not isinstance(rows, int) or rows < 0 or rows % 64:
            raise ValueError(f"KernelConfig.copy_engine_chunk_rows={rows!r}: expected 0 (auto) or a positive multiple of 64")


#: What every group size shares; :data:`DEFAULTS` sets the rest.
_COMMON = dict(dispatch_push_tile=(32, 256, 8), dispatch_copy_out_tile=(16, 512, 8), combine_push_tile=(32, 256, 8),
               combine_reduce_tile=(16, 0, 8), combine_dense_send_tile=(32, 512), combine_dense_reduce_tile=(64, 0, 16),
               sender_share=0.5, copy_engine_min_bytes=16 << 20, copy_engine_chunk_rows=0)

#: The defaults, by group size: the first row whose ``max_ranks`` is at least the group's (None: any).
#: docs/configuration.md gives the measurement behind each value.
DEFAULTS = (
    (2, KernelConfig(**_COMMON, combine_by_copy_engine=True)),
    (None, KernelConfig(**_COMMON, combine_by_copy_engine=False)),
)


def defaults_for(num_ranks: int) -> KernelConfig:
    """The default row of :data:`DEFAULTS` for a group of ``num_ranks`` ranks."""
    for max_ranks, row in DEFAULTS:
        if max_ranks is None or num_ranks <= max_ranks:
            return row
    raise AssertionError("DEFAULTS must end with a row for any number of ranks")


def parse_settings(text: str) -> dict:
    """``"name=value,name=value"`` (values as Python literals; a tuple's commas are kept: items split
    only where a ``name=`` follows) -> ``{name: value}`` of :class:`KernelConfig` fields; raises
    ``ValueError`` for a name that is not a field. For the GPU tests' and probes' command lines."""
    import ast
    import re

    names = {f.name for f in dataclasses.fields(KernelConfig)}
    out = {}
    for item in filter(None, (p.strip() for p in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text.strip(" ,")))):
        name, value = (v.strip() for v in item.split("=", 1))
        if name not in names:
            raise ValueError(f"KernelConfig has no field {name!r} (fields: {', '.join(sorted(names))})")
        out[name] = ast.literal_eval(value)
    return out


__all__ = ["KernelConfig", "DEFAULTS", "defaults_for", "parse_settings"]
