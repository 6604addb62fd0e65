"""``tritonep.KernelConfig``: defaults by group size, strict checks, and docs/configuration.md in step
with the code."""
import dataclasses
import pathlib
import re

import pytest

from tritonep import KernelConfig
from tritonep.config import DEFAULTS, defaults_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_resolve_fills_only_the_fields_left_none():
    two, four = KernelConfig().resolve(2), KernelConfig().resolve(4)
    assert two.combine_by_copy_engine and not four.combine_by_copy_engine
    assert all(getattr(two, f.name) is not None for f in dataclasses.fields(KernelConfig))
    mine = KernelConfig(copy_engine_min_bytes=-1, combine_by_copy_engine=True).resolve(8)
    assert mine.copy_engine_min_bytes == -1 and mine.combine_by_copy_engine
    assert mine.dispatch_push_tile == defaults_for(8).dispatch_push_tile
    assert KernelConfig().resolve(1) == defaults_for(2)  # the first row covers groups of one and two ranks
    assert dataclasses.replace(two, sender_share=0.75).resolve(2).sender_share == 0.75


@pytest.mark.parametrize("fields, fragment", [
    (dict(dispatch_push_tile=(24, 256, 8)), "power of two >= 16"),
    (dict(dispatch_push_tile=(8, 256, 8)), "power of two >= 16"),
    (dict(dispatch_push_tile=(32, 256)), "tuple of 3"),
    (dict(dispatch_copy_out_tile=(16, 500, 8)), "second entry"),
    (dict(combine_push_tile=(32, 256, 3)), "warps"),
    (dict(combine_dense_reduce_tile=(128, 0, 16)), "at most 64"),
    (dict(combine_reduce_tile=(64, 0, 8)), "must not exceed"),
    (dict(sender_share=1.0), "sender_share"),
    (dict(copy_engine_min_bytes=-2), "copy_engine_min_bytes"),
    (dict(combine_by_copy_engine=1), "bool"),
    (dict(copy_engine_chunk_rows=100), "multiple of 64"),
])
def test_bad_values_raise(fields, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        KernelConfig(**fields).resolve(2)


def _doc_rows() -> dict:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \| `([^`]*)` \|", doc, flags=re.M)
    return {name: (two, more) for name, two, more in rows}


def test_docs_table_lists_every_field_with_its_defaults():
    rows = _doc_rows()
    assert list(rows) == [f.name for f in dataclasses.fields(KernelConfig)]
    (max_two, two), (max_more, more) = DEFAULTS
    assert (max_two, max_more) == (2, None), "the docs' table has two columns: 2 ranks and more"
    for name, (doc_two, doc_more) in rows.items():
        assert repr(getattr(two, name)) == doc_two, (name, doc_two)
        assert repr(getattr(more, name)) == doc_more, (name, doc_more)


def test_every_cited_measurement_exists():
    # each default's "measured" column (and the code, where it points to a measurement) names a
    # section of docs/benchmarks.md by its heading
    doc = (ROOT / "docs" / "configuration.md").read_text()
    doc += "".join(p.read_text() for p in (ROOT / "tritonep").rglob("*.py"))
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    headings = re.findall(r"^### (.+)$", bench, flags=re.M)
    cited = re.findall(r'"(20\d\d-\d\d-\d\d[^"\n]*)"', re.sub(r"\s*\n\s*", " ", doc))
    assert cited
    for title in cited:
        assert any(h.startswith(title) for h in headings), title
