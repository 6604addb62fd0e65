"""The bad-input table (docs/errors.md): each rejected input raises the listed error on every rank
before any byte of any buffer changes, and every rank's next valid call still works."""
import pathlib

from tritonep.testing.launch import parallel_launch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _table(info):
    from tritonep.testing.bad_inputs import run_table

    return run_table(info.group)


def test_every_row_raises_first_and_leaves_the_buffers_working():
    out = parallel_launch(2, _table)
    assert out[0] == out[1] >= 40


def test_docs_errors_md_is_the_table():
    from tritonep.testing.bad_inputs import markdown

    assert (ROOT / "docs" / "errors.md").read_text() == markdown(), \
        "regenerate it: python -m tritonep.testing.bad_inputs > docs/errors.md"
