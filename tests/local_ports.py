"""A free TCP port on localhost, for the tests that start a process group through a TCP rendezvous (eval, train,
models). Shared by them (tests/ is on sys.path through tests/conftest.py); celldino.train.distributed has its own
for the library. The port is free when asked, not reserved: tests that can use a file store (tests/gloo_ranks.py)
avoid the race with other processes binding ports."""
import socket


def free_port():
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
