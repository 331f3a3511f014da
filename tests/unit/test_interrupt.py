"""The run's Interrupt cuts what a cancel must not wait for: connects, TLS, reads, sleeps.

Real loopback sockets against a server that never answers: the blocked call is in another
thread, as the fetch stage's is, and must end with `Cancelled` within a fraction of a second.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from tests.support.silent_server import SilentServer

from imagestream.errors import Cancelled
from imagestream.pipeline.interrupt import Interrupt, watching
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.sources import SourceOptions, make_client

pytestmark = pytest.mark.timeout(30)

# Far beyond what the tests wait: only the interrupt can end the calls in time.
SLOW = RetryPolicy(stall_timeout=60, connect_timeout=60)


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


class Blocked:
    """`call` running in its own thread; what it raised, and when it ended."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.ended: float | None = None
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as exc:
            self.error = exc
        self.ended = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the blocked call did not end"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def cut_after_it_blocks(interrupt: Interrupt, blocked: Blocked) -> float:
    """Let the call block a moment, set the interrupt; how long the call took to end."""
    time.sleep(0.3)
    assert blocked.ended is None, f"the call ended before the interrupt: {blocked.error!r}"
    cut = time.monotonic()
    interrupt.set()
    blocked.join(5)
    assert blocked.ended is not None
    return blocked.ended - cut


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_request_waiting_for_an_answer_is_cut(silent: SilentServer, scheme: str) -> None:
    # https: the client waits in its TLS handshake for a ServerHello that never comes.
    interrupt = Interrupt()
    client = make_client(SourceOptions(policy=SLOW), interrupt=interrupt)
    blocked = Blocked(lambda: client.get(f"{scheme}://{silent.address}/v2/"))
    wait_for(lambda: silent.accepted == 1, "the connection")

    assert cut_after_it_blocks(interrupt, blocked) < 1.0
    assert isinstance(blocked.error, Cancelled), repr(blocked.error)
    client.close()


def test_a_connect_that_hangs_is_cut() -> None:
    # A listener whose backlog is full drops further SYNs: connect() waits for the timeout.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    interrupt = Interrupt()
    client = make_client(SourceOptions(policy=SLOW), interrupt=interrupt)
    try:
        blocked = Blocked(lambda: client.get(f"http://127.0.0.1:{port}/"))
        assert cut_after_it_blocks(interrupt, blocked) < 1.0
        assert isinstance(blocked.error, Cancelled), repr(blocked.error)
    finally:
        client.close()
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_request_through_a_proxy_from_the_environment_is_cut(
    silent: SilentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpx builds a separate transport for each proxy: the interrupt must reach those too.
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://{silent.address}")
    interrupt = Interrupt()
    client = make_client(SourceOptions(policy=SLOW), interrupt=interrupt)
    blocked = Blocked(lambda: client.get("http://images.example/disk.zst"))
    wait_for(lambda: silent.accepted == 1, "the connection to the proxy")

    assert cut_after_it_blocks(interrupt, blocked) < 1.0
    assert isinstance(blocked.error, Cancelled), repr(blocked.error)
    client.close()


def test_after_the_interrupt_no_connection_is_made(silent: SilentServer) -> None:
    interrupt = Interrupt()
    interrupt.set()
    client = make_client(SourceOptions(policy=SLOW), interrupt=interrupt)
    with pytest.raises(Cancelled):
        client.get(f"http://{silent.address}/")
    time.sleep(0.1)
    assert silent.accepted == 0
    client.close()


def test_without_an_interrupt_a_client_is_not_cut(silent: SilentServer) -> None:
    # The control: the same request without the interrupt's backend ends only by its timeout.
    interrupt = Interrupt()
    client = make_client(SourceOptions(policy=RetryPolicy(stall_timeout=1.5)))
    blocked = Blocked(lambda: client.get(f"http://{silent.address}/"))
    wait_for(lambda: silent.accepted == 1, "the connection")

    took = cut_after_it_blocks(interrupt, blocked)
    assert took > 0.8
    assert isinstance(blocked.error, httpx.ReadTimeout), repr(blocked.error)
    client.close()


def test_a_sleep_ends_when_the_interrupt_is_set() -> None:
    interrupt = Interrupt()
    blocked = Blocked(lambda: interrupt.sleep(300))
    assert cut_after_it_blocks(interrupt, blocked) < 0.5
    assert isinstance(blocked.error, Cancelled)


def test_watching_sets_the_interrupt_when_the_cancel_event_is_set() -> None:
    cancel = threading.Event()
    with watching(cancel) as interrupt:
        blocked = Blocked(lambda: interrupt.sleep(300))
        time.sleep(0.2)
        cancel.set()
        blocked.join(2)
    assert isinstance(blocked.error, Cancelled)
    assert not [t for t in threading.enumerate() if t.name == "imagestream-cancel-watch"]
