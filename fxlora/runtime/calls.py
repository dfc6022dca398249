"""What keeps concurrent calls apart: per-thread pinned gate states and the process-wide call lock.

Threading contract (stated in the README):

- Every call of a LoRA model reads *one* `fxlora.core.gates.GateState` from start to end: the first
  fxlora forward a thread enters pins the model's published state (or, for a mixed batch, a state
  made for that call alone) for this thread, and every adapted layer of the call reads the pin.
  ``set_adapter``, ``disable_adapter``, ``set_adapter_scale`` publish a new state and never write
  one a running call reads, so a call racing them computes with the state before or the one after.
- torch.fx tracing patches ``nn.Module.__call__`` process-wide while it runs, so a trace must never
  overlap a forward in another thread. `CALL_LOCK` is a shared/exclusive lock: forwards hold it
  shared (they run concurrently), tracing and changes of the model's structure or weights (adding
  or deleting adapters, merging, loading) hold it exclusively, after the calls in flight finish. A
  thread that must trace in the middle of its own call (a new call pattern) gives up its shared
  hold while it waits, so two such threads never deadlock.
- Code under ``torch.compile`` takes no lock and pins nothing itself (dynamo cannot trace either);
  ``LoraModel.forward`` runs outside the compiled region and does both for it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import torch

from fxlora.core.gates import GateState

__all__ = ["SharedLock", "CALL_LOCK", "Pin", "exclusive", "outside_compile"]

T = TypeVar("T")


class SharedLock:
    """A reentrant shared/exclusive lock that prefers waiting writers.

    A thread holding the lock shared may ask for it exclusively: its shared hold is released while
    it waits and taken back afterwards.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer: Optional[int] = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def shared(self) -> "_SharedHold":
        """Hold the lock shared (nested holds in one thread count once); a context manager."""
        return _SharedHold(self)

    def _enter_shared(self) -> bool:
        """Take a shared hold; True where it is this thread's outermost one."""
        depth = self._depth()
        outer = depth == 0 and self._writer != threading.get_ident()
        if outer:
            with self._mutex:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        return outer

    def _exit_shared(self, outer: bool) -> None:
        self._local.depth -= 1
        if outer:
            with self._mutex:
                self._readers -= 1
                if self._waiting_writers:  # only a writer waits for readers to leave
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, wait: Union[bool, float] = True) -> Iterator[bool]:
        """Hold the lock alone: waits until no other thread holds it, and yields True. With
        `wait` False it never waits: where another thread holds the lock or waits for it, it
        yields False at once without taking it. With `wait` a number it waits at most that many
        seconds, then yields False, this thread's shared hold (if any) taken back as it was."""
        me = threading.get_ident()
        if self._writer == me:
            self._writer_depth += 1
            try:
                yield True
            finally:
                self._writer_depth -= 1
            return
        holding = self._depth() > 0
        with self._cond:
            if wait is False and (self._writer is not None or self._waiting_writers or self._readers > int(holding)):
                taken = False
            else:
                taken = self._wait_to_write(holding, None if wait is True else time.monotonic() + wait)
        if not taken:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._writer = None
                if holding:
                    self._readers += 1
                self._cond.notify_all()

    def _wait_to_write(self, holding: bool, deadline: Optional[float]) -> bool:
        """With the mutex held: become the writer, by `deadline` (None: however long it takes);
        False where the deadline passed first (a shared hold of this thread's is back then)."""
        if holding:
            self._readers -= 1
            self._cond.notify_all()
        self._waiting_writers += 1
        try:
            while self._writer is not None or self._readers:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            else:
                self._writer = threading.get_ident()
                return True
        finally:
            self._waiting_writers -= 1
        while holding and self._writer is not None:  # take the shared hold back once no one writes
            self._cond.wait()
        self._readers += int(holding)
        self._cond.notify_all()  # readers that waited behind this writer go on
        return False


class _SharedHold:
    """A shared hold of a `SharedLock` (a class, not a generator: every call enters one)."""

    __slots__ = ("_lock", "_outer")

    def __init__(self, lock: SharedLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._outer = self._lock._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock._exit_shared(self._outer)


#: the process-wide lock between forwards (shared) and tracing / structural changes (exclusive)
CALL_LOCK = SharedLock()


def exclusive(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run `fn` holding `CALL_LOCK` exclusively."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with CALL_LOCK.exclusive():
            return fn(*args, **kwargs)

    return wrapper


class Pin:
    """The `GateState` each thread's current call of one model reads (`AdapterState` owns one)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Optional[GateState]:
        return getattr(self._local, "state", None)

    def hold(self, state: GateState, replace: bool = False) -> "_PinHold":
        """Pin `state` for this thread for the duration of the block (a context manager giving
        the state pinned); a pin already held is kept (nested calls read their outermost call's
        state) unless `replace`."""
        return _PinHold(self, state, replace)

    def call_memo(self, make: Callable[[], T]) -> Optional[T]:
        """An object kept for this thread's outermost call in flight (made by `make` on first
        use, dropped when that call ends); None outside any call."""
        if self.get() is None:
            return None
        memo = getattr(self._local, "memo", None)
        if memo is None:
            memo = self._local.memo = make()
        return memo

    def __reduce__(self) -> tuple:
        return (Pin, ())  # a copy (deepcopy, pickle) has no call in flight


class _PinHold:
    """`Pin.hold`'s context (a class, not a generator: every call enters one)."""

    __slots__ = ("_pin", "_state", "_replace", "_previous", "_kept")

    def __init__(self, pin: Pin, state: GateState, replace: bool) -> None:
        self._pin, self._state, self._replace = pin, state, replace

    def __enter__(self) -> GateState:
        local = self._pin._local
        previous = self._previous = getattr(local, "state", None)
        self._kept = previous is not None and not self._replace
        if self._kept:
            return previous
        local.state = self._state
        return self._state

    def __exit__(self, *exc: object) -> None:
        if self._kept:
            return
        local = self._pin._local
        local.state = self._previous
        if self._previous is None:  # the outermost call ends
            local.memo = None


def outside_compile(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` with its own frame kept out of ``torch.compile`` while the calls it makes are compiled
    (``torch.compiler.disable(recursive=False)``): the frame that takes `CALL_LOCK` and the pin for
    the compiled code below it.

    Its code is also marked as skipped for dynamo's frame evaluation where this torch allows it
    (``torch._dynamo.eval_frame.skip_code``, the mark ``recursive=False`` itself declines to
    cache). Without it dynamo examines the frame again on every call, about 0.1 ms. Callers dynamo
    traces still break the graph at the call, as the disable asks. While ``torch.export`` exports
    (which refuses such a disable) `fn` is called as it is: an exported program captures it whole."""
    disabled = torch.compiler.disable(fn, recursive=False)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        if torch.compiler.is_exporting():
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # another torch: the disable alone
        pass
    else:
        skip_code(fn.__code__)
        skip_code(call.__code__)
    return call
