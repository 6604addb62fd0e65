"""Environment variables parse strictly, README documents exactly them, and CI runs README's test command."""
import dataclasses
import pathlib
import re

import pytest

from tritonep.envs import Envs, parse_envs, tile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_defaults_and_parsing():
    assert parse_envs({}) == Envs()
    e = parse_envs({"TRITONEP_BACKEND": "AllToAll", "TRITONEP_GPU_TIMEOUT_SECS": "2.5", "TRITONEP_DEBUG": "0"})
    assert (e.TRITONEP_BACKEND, e.TRITONEP_GPU_TIMEOUT_SECS, e.TRITONEP_DEBUG) == ("alltoall", 2.5, False)
    assert parse_envs({"TRITONEP_DEBUG": "yes"}).TRITONEP_DEBUG is True
    assert parse_envs({"TRITONEP_DEVICE": "CUDA"}).TRITONEP_DEVICE == "cuda"
    assert tile(parse_envs({"TRITONEP_DISPATCH_PUSH_TILE": " 32X256x8"}).TRITONEP_DISPATCH_PUSH_TILE) == (32, 256, 8)
    assert tile(parse_envs({}).TRITONEP_DISPATCH_PUSH_TILE) is None


@pytest.mark.parametrize("env", [{"TRITONEP_BACKEND": "nvshmem"}, {"TRITONEP_DEVICE": "gpu"}, {"TRITONEP_DEBUG": "maybe"},
                                 {"TRITONEP_GPU_TIMEOUT_SECS": "-1"}, {"TRITONEP_CPU_TIMEOUT_SECS": "soon"},
                                 {"TRITONEP_DISPATCH_PUSH_TILE": "24x256x8"}, {"TRITONEP_DISPATCH_PUSH_TILE": "32x256"},
                                 {"TRITONEP_DISPATCH_PUSH_TILE": "32x200x8"}, {"TRITONEP_DISPATCH_PUSH_TILE": "32x256x3"}])
def test_bad_values_raise(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        parse_envs(env)


def test_readme_table_lists_exactly_the_variables():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(TRITONEP_[A-Z_]+)` \|", readme, flags=re.M))
    assert documented == {f.name for f in dataclasses.fields(Envs)}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    test_cmds = [line for b in blocks for line in b.splitlines() if "pytest" in line]
    assert test_cmds, "README has no test command"
    assert test_cmds[0].strip() in ci
