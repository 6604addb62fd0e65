"""Environment variables parse strictly, docs/configuration.md documents exactly them, and CI runs
README's test command."""
import dataclasses
import pathlib
import re

import pytest

from tritonep.envs import Envs, parse_envs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_defaults_and_parsing():
    assert parse_envs({}) == Envs()
    e = parse_envs({"TRITONEP_BACKEND": "AllToAll", "TRITONEP_GPU_TIMEOUT_SECS": "2.5", "TRITONEP_DEBUG": "0"})
    assert (e.TRITONEP_BACKEND, e.TRITONEP_GPU_TIMEOUT_SECS, e.TRITONEP_DEBUG) == ("alltoall", 2.5, False)
    assert parse_envs({"TRITONEP_DEBUG": "yes"}).TRITONEP_DEBUG is True
    assert parse_envs({"TRITONEP_DEVICE": "CUDA"}).TRITONEP_DEVICE == "cuda"
    assert parse_envs({"TRITONEP_SCALEUP_SIZE": " 4"}).TRITONEP_SCALEUP_SIZE == 4
    # deployment settings only: the scale-out issue adds one (TRITONEP_SCALEUP_SIZE) within six
    assert len(dataclasses.fields(Envs)) <= 6


@pytest.mark.parametrize("env", [{"TRITONEP_BACKEND": "nvshmem"}, {"TRITONEP_DEVICE": "gpu"}, {"TRITONEP_DEBUG": "maybe"},
                                 {"TRITONEP_GPU_TIMEOUT_SECS": "-1"}, {"TRITONEP_CPU_TIMEOUT_SECS": "soon"},
                                 {"TRITONEP_SCALEUP_SIZE": "-2"}, {"TRITONEP_SCALEUP_SIZE": "two"}])
def test_bad_values_raise(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        parse_envs(env)


def test_docs_table_lists_exactly_the_variables():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = re.findall(r"^\| `(TRITONEP_[A-Z_]+)` \| `([^`]*)` \|", doc, flags=re.M)
    assert [name for name, _ in documented] == [f.name for f in dataclasses.fields(Envs)]
    for name, default in documented:  # the documented default is what an empty environment gives
        assert parse_envs({name: default}) == Envs(), (name, default)


def test_the_library_reads_no_other_variable():
    # every TRITONEP_* name in the package is a field of Envs (os.environ is read in envs.py only)
    names = set()
    for path in (ROOT / "tritonep").rglob("*.py"):
        names |= set(re.findall(r"\bTRITONEP_[A-Z_]+", path.read_text()))
    assert names <= {f.name for f in dataclasses.fields(Envs)} | {"TRITONEP_TEST_SHARED_GPU"}, names


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    test_cmds = [line for b in blocks for line in b.splitlines() if "pytest" in line]
    assert test_cmds, "README has no test command"
    assert test_cmds[0].strip() in ci
