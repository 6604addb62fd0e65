"""The fast launcher (kernels/launch.py): its key is never coarser than Triton's specialization, and
a reused compiled kernel gets every parameter in signature order. A fake kernel stands in for a
compiled one (CPU ranks have nothing compiled); the GPU suite runs the real path."""
from types import SimpleNamespace

import pytest
import torch

from tritonep.kernels.launch import Launcher


def test_key_separates_what_triton_specializes_on():
    go = Launcher(_FakeKernel(), fast=True)

    def key(a=None, b=3, n=5, **kw):
        return go.key((a, b, n), kw, 0)

    buf = torch.zeros(64, dtype=torch.int32)
    assert key(buf[:8]) == key(buf[4:12])  # both 16-byte aligned
    assert key(buf[:8]) != key(buf[1:9])  # alignment
    assert key(buf) != key(buf.view(torch.float32))  # pointer type
    assert key(buf, n=17) == key(buf, n=32)  # do_not_specialize: only the range counts
    assert key(buf, n=17) != key(buf, n=2**31)
    for b0, b1 in ((1, 2), (16, 32), (True, 1)):  # other values exactly
        assert key(buf, b=b0) != key(buf, b=b1), (b0, b1)
    assert key(buf, BT=16) != key(buf, BT=32)  # constexprs by value
    with pytest.raises((AttributeError, TypeError)):  # a tensor position given something else: Triton decides
        key(3)


def test_key_types_each_loose_integer_on_its_own():
    # Triton gives every do_not_specialize integer its own width: a key with one "all fit" flag
    # handed a kernel with b as i32 to a call whose b needs 64 bits (an illegal address on a GPU)
    go = Launcher(_FakeKernel(loose=("b", "n")), fast=True)
    buf = torch.zeros(8, dtype=torch.int32)
    assert go.key((buf, 2**31, 1), {}, 0) != go.key((buf, 1, 2**31), {}, 0)
    assert go.key((buf, 2**31, 1), {}, 0) == go.key((buf, -(2**40), 7), {}, 0)


class _FakeCompiled:
    """Stands for a ``CompiledKernel``: ``run`` is its launcher (grid, stream, function, metadata,
    launch metadata, two hooks, then every parameter)."""
    function = "function"
    packed_metadata = "metadata"

    def __init__(self):
        self.calls = []

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        assert (function, metadata, launch_metadata, enter_hook, exit_hook) == (self.function, "metadata", None, None, None)
        self.calls.append(((gx, gy, gz), args))


class _FakeKernel:
    """Parameters ``a, b, n, BT: constexpr, BK: constexpr = 4``; ``n`` is ``do_not_specialize``."""
    __name__ = "fake"

    def __init__(self, loose=("n",)):
        self.params = [SimpleNamespace(name=n, default=d, is_constexpr=c, do_not_specialize=n in loose)
                       for n, d, c in (("a", None, False), ("b", None, False), ("n", None, False),
                                       ("BT", None, True), ("BK", 4, True))]
        self.compiled = _FakeCompiled()
        self.jit_calls = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls += 1
            return self.compiled
        return run


def test_reuses_the_compiled_kernel_with_every_parameter_in_order():
    k = _FakeKernel()
    go = Launcher(k, fast=True)
    x, y = torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    go(3, x, y, 17, BT=16, num_warps=8)  # first call: through Triton
    assert k.jit_calls == 1 and not k.compiled.calls
    go(5, y, x, 32, BT=16, num_warps=8)  # same key: the compiled kernel, constexprs appended
    assert k.jit_calls == 1
    grid, args = k.compiled.calls[-1]
    # tensors go as their addresses: Triton's launcher would ask the driver about each pointer
    assert grid == (5, 1, 1) and args == (y.data_ptr(), x.data_ptr(), 32, 16, 4)
    go(5, y, 7, 32, BT=16, num_warps=8)  # an int where a tensor was: Triton again
    go(5, y, x, 32, BT=8, num_warps=8)  # another constexpr: Triton again
    assert k.jit_calls == 3


def test_runtime_arguments_by_keyword_are_refused():
    go = Launcher(_FakeKernel(), fast=True)
    with pytest.raises(TypeError, match="positional"):
        go(1, torch.zeros(4), torch.zeros(4), n=3, BT=16)


def test_cache_is_capped():
    k = _FakeKernel()
    go = Launcher(k, fast=True)
    x = torch.zeros(8)
    for b in range(200):  # a value that never repeats
        go(1, x, b, 1, BT=16)
    assert len(go._compiled) <= 64 and k.jit_calls == 200


def test_parse_settings_takes_literals_and_rejects_unknown_names():
    # TRITONEP_TEST_CONFIG / profile_ep.py --config / bench_ep.py --config: KernelConfig fields as Python literals
    from tritonep.config import parse_settings

    got = parse_settings(" copy_engine_chunk_rows=128,combine_dense_reduce_tile=(64, 256, 16),")
    assert got == {"copy_engine_chunk_rows": 128, "combine_dense_reduce_tile": (64, 256, 16)}
    with pytest.raises(ValueError, match="no field 'nope'"):
        parse_settings("nope=1")


def test_push_refuses_tiles_its_blocks_cannot_take():
    # a fresh push reads the layout's 16-token blocks: other steps are refused before any launch
    import inspect

    from tritonep.kernels import dispatch

    args = {name: None for name, p in inspect.signature(dispatch.push).parameters.items()
            if p.default is inspect.Parameter.empty}
    args["topk_idx"] = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="a fresh push takes a multiple of 16"):
        dispatch.push(**{**args, "block_base": torch.zeros(1, 2, dtype=torch.int32), "tile": (8, 256, 8)})


class _FakeDriver:
    """Stands for the CUDA driver of ``launch.pack``: the loaded kernel's parameter sizes, and a
    ``cuLaunchKernel`` that reads every parameter through the pointers it is given."""

    def __init__(self, sizes):
        self.sizes, self.launches = sizes, []

    def params(self, function):
        return list(self.sizes)

    def launch(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        import ctypes

        ptrs = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        values = [ctypes.c_uint64.from_address(ptrs[i]).value for i in range(len(self.sizes))]
        self.launches.append(((function.value, gx, gy, gz, bx, shared, stream.value), values))
        return 0

    def error(self, rc):
        return "fake error"


def _packable(kernel, **meta):
    """``kernel``'s compiled stand-in, with what ``pack`` reads: ``a: *i32, b: i32, n: i64`` and two constexprs."""
    c = kernel.compiled
    c.src = SimpleNamespace(signature={"a": "*i32", "b": "i32", "n": "i64", "BT": "constexpr", "BK": "constexpr"})
    c.metadata = SimpleNamespace(**{"num_warps": 4, "shared": 512, "num_ctas": 1, "launch_cooperative_grid": False,
                                    "launch_pdl": False, "global_scratch_size": 0, "profile_scratch_size": 0, **meta})
    c.function, c.name = 77, "fake"
    return c


def test_reused_kernels_launch_from_a_parameter_buffer(monkeypatch):
    from tritonep.kernels import launch

    driver = _FakeDriver([8, 4, 8, 8, 8])  # ours, then Triton's two scratch pointers
    monkeypatch.setattr(launch, "_driver", driver)
    k = _FakeKernel()
    _packable(k)
    go = Launcher(k, fast=True)
    x, y = torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    go(3, x, -5, 17, BT=16, num_warps=4)  # through Triton
    go(3, x, -5, 18, BT=16, num_warps=4)  # the compiled launcher, and the buffer is built
    assert k.jit_calls == 1 and len(k.compiled.calls) == 1 and not driver.launches
    go(5, y, -5, 2**31 - 1, BT=16, num_warps=4)  # straight to the driver: only the address and n rewritten
    (function, gx, gy, gz, block, shared, stream), values = driver.launches[-1]
    assert (function, gx, gy, gz, block, shared) == (77, 5, 1, 1, 128, 512)
    # -5 as a 32-bit parameter reads the low 4 bytes of its slot; scratch pointers null
    assert values == [y.data_ptr(), 2**64 - 5, 2**31 - 1, 0, 0]
    assert len(k.compiled.calls) == 1
    go(0, y, -5, 3, BT=16, num_warps=4)  # an empty grid launches nothing, as Triton
    assert len(driver.launches) == 1


@pytest.mark.parametrize("sizes, meta", [
    ([8, 4], {}),  # the loaded kernel has a parameter fewer than the signature says
    ([8, 4, 8, 8, 8, 8], {}),  # or more than two after ours
    ([4, 4, 8, 8, 8], {}),  # a pointer that is not 8 bytes
    ([8, 4, 8, 8, 8], {"launch_cooperative_grid": True}),  # a launch option the buffer does not carry
    ([8, 4, 8, 8, 8], {"global_scratch_size": 256}),  # scratch memory Triton allocates per launch
])
def test_kernels_the_driver_does_not_confirm_go_through_triton(monkeypatch, sizes, meta):
    from tritonep.kernels import launch

    k = _FakeKernel()
    assert launch.pack(_packable(k, **meta), [16, 1, 2, 16, 4], driver=_FakeDriver(sizes)) is None
    assert launch.pack(_packable(k), [16, 1, 2, 16, 4], driver=_FakeDriver([8, 4, 8, 8, 8])) is not None
    monkeypatch.setattr(launch, "_driver", _FakeDriver(sizes))
    _packable(k, **meta)
    go = Launcher(k, fast=True)
    x = torch.zeros(8, dtype=torch.int32)
    for n in range(3):
        go(1, x, 1, n + 5, BT=16)
    assert len(k.compiled.calls) == 2 and not launch._driver.launches
