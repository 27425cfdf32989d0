"""A free TCP port on localhost, for the tests that start a process group through a TCP rendezvous (torchrun-style
env:// in train and models). Shared by them (tests/ is on sys.path through tests/conftest.py). The port is free when
asked, not reserved: tests that can use a file store (tests/gloo_ranks.py: run_on_gloo_ranks, init_gloo) avoid the race
with other processes binding ports; the others start their processes through communicate_on_a_free_port, which
starts them again on a new port when the one chosen was taken in between."""
import socket

# what a TCP store says when it cannot listen on its port (torch.distributed.DistNetworkError: ... EADDRINUSE)
PORT_IN_USE = "EADDRINUSE"


def free_port():
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_on_a_free_port(start, timeout, attempts=3):
    """[(exit code, output)] of the processes `start(port)` returns (subprocess.Popen with a text stdout pipe, the
    one whose TCP store listens on `port` first: rank 0, or torchrun's node 0), for a port from free_port, each
    waited for up to `timeout` s (on a time-out every process is killed and subprocess.TimeoutExpired raised).

    The port is only free when chosen: when the first process fails saying EADDRINUSE (something bound the port
    before its store did), the others, which may have joined whatever holds the port, are killed and all are
    started again on a new port, at most `attempts` runs in all; any other failure is returned as it is."""
    for attempt in range(1, attempts + 1):
        procs = start(free_port())
        outputs = []
        try:
            for proc in procs:
                out = proc.communicate(timeout=timeout)[0]
                outputs.append((proc.returncode, out))
                if len(outputs) == 1 and proc.returncode != 0 and PORT_IN_USE in out and attempt < attempts:
                    break  # the port was taken: start again
            else:
                return outputs
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
