import os, time, torch, torch.distributed as dist
for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29571")):
    os.environ.setdefault(k, v)
torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
from tritonep import ElasticBuffer
from tritonep import stream_ops
from tritonep.copy_engine import copy_bytes
buf = ElasticBuffer(dist.group.WORLD, num_bytes=ElasticBuffer.get_pp_buffer_size_hint(1 << 20, 4), explicitly_destroy=True)
buf.pp_set_config(1 << 20, 4)
pipe = buf._pipe
t = torch.randint(0, 255, (64 << 10,), dtype=torch.uint8, device="cuda")
out = torch.empty_like(t)

def timeit(fn, iters=200):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); h0 = time.perf_counter()
    for _ in range(iters): fn()
    h = (time.perf_counter() - h0) * 1e6 / iters
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / iters, h

cs = lambda: torch.cuda.current_stream().cuda_stream
heap = buf._backend.heap
word = pipe.words.signal_addrs[0]
rows = []
rows.append(("pp exchange (watched waits)", timeit(lambda: (buf.pp_send(t, 0), buf.pp_recv(out, 0)))))
orig = pipe.signals.wait
pipe.signals.wait = lambda addr, value, peer, what: stream_ops.stream_wait(cs(), addr, value)
rows.append(("pp exchange (plain waits)", timeit(lambda: (buf.pp_send(t, 0), buf.pp_recv(out, 0)))))
pipe.signals.wait = orig
rows.append(("2 copies", timeit(lambda: (copy_bytes(heap.data_addrs[0], t.data_ptr(), t.nbytes, cs()), copy_bytes(out.data_ptr(), heap.data_addrs[0], t.nbytes, cs())))))
n = [0]
def wr():
    n[0] += 1
    stream_ops.stream_write(cs(), word + 12, n[0])
rows.append(("1 flag write (fence)", timeit(wr)))
rows.append(("1 flag write to pinned host", timeit(lambda: stream_ops.stream_write(cs(), pipe.signals.watchdog._base + 16, 5))))
def ww():
    n[0] += 1
    stream_ops.stream_write(cs(), word + 12, n[0])
    stream_ops.stream_wait(cs(), word + 12, n[0])
rows.append(("write + wait", timeit(ww)))
rows.append(("torch copy_ 64KB", timeit(lambda: out.copy_(t))))
for name, (g, h) in rows:
    print(f"{name:32s} GPU {g:7.1f} us/iter   host {h:7.1f} us/iter")
buf.destroy()
