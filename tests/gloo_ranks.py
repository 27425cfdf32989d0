"""Run a function on several gloo ranks (spawned CPU processes) and collect what each rank returns.

Shared by the distributed tests of kernels/ and losses/ (tests/ is on sys.path through tests/conftest.py).
"""
import queue as queue_module
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def init_gloo(rank, world, store_file):
    """Join a gloo group of `world` processes through a file store (`store_file`: a fresh path under tmp_path), not a
    TCP port: a "free" port picked by the parent and handed to the workers races with anything else binding ports
    on a shared machine."""
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)


def _rank_main(fn, rank, world, store_file, args, results, done, timeout):
    init_gloo(rank, world, store_file)
    try:
        results.put((rank, fn(rank, world, *args)))
        # Tensors cross the queue as shared-memory handles that this process serves: exiting before the parent has
        # unpickled them fails there with ConnectionResetError.
        done.wait(timeout)
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, args, store_file, world=2, timeout=300):
    """{rank: fn(rank, world, *args)} with a gloo group of `world` spawned processes; `store_file` must not exist
    (a fresh path under tmp_path). A rank that dies is reported at once with its exit code, not after `timeout`."""
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, str(store_file), args, results, done, timeout))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, value = results.get(timeout=1)
                out[rank] = value
            except queue_module.Empty:
                dead = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
                assert not dead, f"gloo ranks died before returning (rank: exit code): {dead}"
                assert time.monotonic() < deadline, f"gloo ranks returned {sorted(out)} of {world} in {timeout} s"
    finally:
        done.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    return out
