"""Gated code waits for torch.compile: eager use never builds it, a compiled model meets no missing
code (no graph break, no extra recompile), and a build never waits for another thread's lock
inside dynamo's compile-start callback."""

import contextlib
import copy
import pickle
import threading
import time

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import compile_builds
from fxlora.runtime.calls import CALL_LOCK, SharedLock
from fxlora.runtime.forwards import installed_forward
from models import MLP

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

CONFIG = dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], init_lora_weights=False)


def adapted(mode="eval"):
    torch.manual_seed(0)
    model = fxlora.transform(MLP(16), LoraConfig(**CONFIG))
    return model.eval() if mode == "eval" else model.train()


def test_transform_and_eager_calls_build_no_gated_code():
    model = adapted()
    forward = installed_forward(model.model)
    assert forward._gated == {} and forward._unbuilt == set(forward.variants)
    x = torch.randn(4, 20)
    model(x)
    with model.disable_adapter():
        model(x)
    model.train()
    model(x).sum().backward()
    assert forward._gated == {}
    assert {key.training for key in forward._unbuilt} == {False, True}  # the training patterns wait too


@pytest.mark.parametrize("inner", [False, True], ids=["lora_model", "inner_model"])
def test_a_compiled_model_builds_its_gated_code_before_tracing(inner):
    model = adapted()
    x = torch.randn(4, 20)
    want = model(x)
    counter = CompileCounter()
    compiled = torch.compile(model.model if inner else model, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), want)
    with model.disable_adapter():
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1  # one graph, no break, no recompile on the switch
    forward = installed_forward(model.model)
    assert forward._unbuilt == set() and set(forward._gated) == set(forward.variants)


def test_a_reset_after_transform_still_compiles_the_lora_model_whole():
    model = adapted()
    x = torch.randn(4, 20)
    torch._dynamo.reset()  # drops dynamo's compile-start callbacks
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1


def test_a_reset_after_transform_leaves_an_inner_compile_exact():
    model = adapted()
    x = torch.randn(4, 20)
    want = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model.model, backend="eager")  # the code is built on first use: a graph break
    torch.testing.assert_close(compiled(x), want)
    torch.testing.assert_close(compiled(x), want)


def test_mode_switch_defers_training_code_and_a_compiled_step_matches_eager():
    model = adapted("train")
    eager = copy.deepcopy(model)
    x = torch.randn(4, 20)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x).sum().backward()
    eager(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@contextlib.contextmanager
def read_in_another_thread(lock):
    """`lock` held shared by another thread for the duration of the block."""
    holding, release = threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            holding.set()
            release.wait(timeout=60)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert holding.wait(timeout=60)
        yield
    finally:
        release.set()
        thread.join(timeout=60)


def test_the_compile_callback_never_waits_for_another_threads_lock():
    model = adapted()
    forward = installed_forward(model.model)
    with read_in_another_thread(CALL_LOCK):
        compile_builds.build_deferred(wait=False)  # returns at once, nothing built
        assert forward._unbuilt and forward._gated == {}
    compile_builds.build_deferred(wait=False)
    assert forward._unbuilt == set() and set(forward._gated) == set(forward.variants)


def test_a_copy_and_a_pickled_model_defer_their_code_and_compile_whole():
    model = adapted()
    x = torch.randn(4, 20)
    for make in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):  # one at a time: a compile builds all that wait
        clone = make(model)
        forward = installed_forward(clone.model)
        assert forward._gated == {} and forward._unbuilt == set(forward.variants)
        counter = CompileCounter()
        torch.testing.assert_close(torch.compile(clone, backend=counter, fullgraph=True)(x), model(x))
        assert counter.frame_count == 1


def test_without_a_compile_callback_gated_code_is_built_at_once(monkeypatch):
    monkeypatch.setattr(compile_builds, "_HANDLER", None)
    forward = installed_forward(adapted().model)
    assert forward._unbuilt == set() and set(forward._gated) == set(forward.variants)


def test_an_exclusive_hold_without_waiting_takes_a_free_lock_or_declines_at_once():
    lock = SharedLock()
    with lock.exclusive(wait=False) as held:
        assert held
        with lock.exclusive(wait=False) as again:  # reentrant
            assert again
    with lock.shared():
        with lock.exclusive(wait=False) as held:  # only this thread reads: upgraded
            assert held
    results = []
    with read_in_another_thread(lock):
        with lock.exclusive(wait=False) as held:
            results.append(held)
    with lock.exclusive(wait=False) as held:
        results.append(held)
    assert results == [False, True]


def hold_shared_in_another_thread(lock, seconds):
    """A thread that takes `lock` shared, holds it `seconds`, and releases it; started and
    holding when this returns."""
    holding = threading.Event()

    def reader():
        with lock.shared():
            holding.set()
            time.sleep(seconds)

    thread = threading.Thread(target=reader)
    thread.start()
    assert holding.wait(timeout=60)
    return thread


def test_an_exclusive_hold_with_a_bounded_wait_takes_the_lock_in_time_or_gives_up_as_it_was():
    lock = SharedLock()
    brief = hold_shared_in_another_thread(lock, 0.05)
    with lock.exclusive(wait=30) as held:  # the reader leaves in time
        assert held
    brief.join()
    long = hold_shared_in_another_thread(lock, 2.0)
    started = time.monotonic()
    with lock.shared():  # this thread reads too: it gives its hold back while waiting, and takes it back
        with lock.exclusive(wait=0.1) as held:
            assert not held and time.monotonic() - started < 1.5
        entered = []

        def write():
            with lock.exclusive() as taken:
                entered.append(taken)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.1)
        assert entered == []  # this thread still holds the lock shared: no writer gets in
    long.join()
    writer.join(timeout=60)
    assert entered == [True]


def test_two_threads_compiling_one_model_at_once_compute_the_eager_results():
    model = adapted()
    x = torch.randn(4, 20)
    want = model(x)
    compiled = torch.compile(model, backend="eager")
    barrier, results, errors = threading.Barrier(2), [], []

    def worker():
        barrier.wait()
        try:
            for _ in range(5):
                results.append(compiled(x))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert len(results) == 10
    for got in results:
        torch.testing.assert_close(got, want)


def test_a_build_failing_in_the_compile_callback_fails_only_its_own_model(monkeypatch):
    broken, healthy = adapted(), adapted()
    x = torch.randn(4, 20)
    forward = installed_forward(broken.model)

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(forward, "_build", failing)
    torch.testing.assert_close(torch.compile(healthy, backend="eager", fullgraph=True)(x), healthy(x))
    assert forward._unbuilt  # left to its first use
    with pytest.raises(RuntimeError, match="out of memory"):
        torch.compile(broken.model, backend="eager")(x)


class Scalable(torch.nn.Module):
    """A model whose example call (``forward(x)``) leaves its ``scale`` pattern unseen; with
    `check`, that pattern does not trace (a branch on the scale's value)."""

    def __init__(self, check: bool = False):
        super().__init__()
        self.lin, self.out, self.check = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), check

    def forward(self, x, scale=None):
        h = self.lin(x)
        if scale is not None and (not self.check or bool(scale.sum() > 0)):
            h = h * scale
        return self.out(h)


def scalable_pair(check: bool = False):
    peft = pytest.importorskip("peft")
    from models import copy_peft_adapter_weights

    torch.manual_seed(0)
    base = Scalable(check).eval()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["lin", "out"]))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin", "out"], init_lora_weights=False))
    copy_peft_adapter_weights(reference, ours)
    return ours.eval(), reference.eval()


def test_a_pattern_first_met_by_a_compiled_call_is_traced_while_dynamo_traces_it():
    """The ``scale`` pattern is new to fxlora when dynamo meets it: it is traced there and then,
    so the compiled model is one graph (``fullgraph``) and computes peft's result."""
    ours, reference = scalable_pair()
    forward = installed_forward(ours.model)
    known = set(forward.variants) | set(forward.pending)
    x, scale = torch.randn(3, 8), torch.tensor(2.0)
    counter = CompileCounter()
    with torch.no_grad():
        got = torch.compile(ours, backend=counter, fullgraph=True)(x, scale=scale)
        torch.testing.assert_close(got, reference(x, scale=scale), rtol=0, atol=0)
    assert counter.frame_count == 1
    assert len(set(forward.variants) - known) == 1  # the new pattern, traced once
    with torch.no_grad():
        torch.testing.assert_close(ours(x, scale=scale), got, rtol=0, atol=0)  # eager calls reuse the trace


def test_a_new_pattern_that_does_not_trace_falls_back_to_the_roots_own_forward_in_a_compiled_call():
    ours, reference = scalable_pair(check=True)
    forward = installed_forward(ours.model)
    x, scale = torch.randn(3, 8), torch.tensor(2.0)
    with torch.no_grad():
        got = torch.compile(ours, backend="eager")(x, scale=scale)
        torch.testing.assert_close(got, reference(x, scale=scale), rtol=0, atol=0)
    assert len(forward.failures) == 1  # tried once (at trace time), not again by the fallback


def test_identical_blocks_meeting_a_new_pattern_in_a_compiled_call_trace_it_once(monkeypatch):
    """``output_hidden_states`` reaches a llama's attention blocks as a keyword no example call
    passed: the first compiled call traces that pattern once for all three blocks, compiles no
    more frames than the model without adapters (transformers' own hooks break its graph once)
    and gives eager fxlora's hidden states."""
    from models import tiny_llama
    from test_install import count_traces

    base = tiny_llama(3)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 96, (2, 6))
    plain, ours = CompileCounter(), CompileCounter()
    with torch.no_grad():
        torch.compile(base, backend=plain)(input_ids=ids, output_hidden_states=True)
    compile_builds.build_deferred(wait=True)  # the patterns the example call saw: traced now, not counted
    calls = count_traces(monkeypatch)
    with torch.no_grad():
        got = torch.compile(model, backend=ours)(input_ids=ids, output_hidden_states=True)
        assert ours.frame_count == plain.frame_count  # no graph break of fxlora's (6 more frames without)
        assert calls == ["LlamaAttention", "LlamaAttention lifted"]  # once, and once with layer_idx lifted
        want = model(input_ids=ids, output_hidden_states=True)
    assert len(calls) == 2  # the eager call found it traced
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b)


def test_a_new_pattern_met_while_another_thread_is_in_a_call_waits_for_it_and_compiles_whole():
    """The trace at trace time waits (a bounded time) for a call in another thread to finish
    (the inner model compiled: no `LoraModel.forward` builds the code before dynamo starts)."""
    ours, reference = scalable_pair()
    x, scale = torch.randn(3, 8), torch.tensor(2.0)
    holding = threading.Event()

    def call_in_flight():  # leaves soon after the trace starts waiting for it (or after 10 s)
        with CALL_LOCK.shared():
            holding.set()
            deadline = time.monotonic() + 10
            while not CALL_LOCK._waiting_writers and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)

    other = threading.Thread(target=call_in_flight)
    other.start()
    assert holding.wait(timeout=60)
    with torch.no_grad():
        got = torch.compile(ours.model, backend="eager", fullgraph=True)(x, scale=scale)  # a break would raise
        torch.testing.assert_close(got, reference(x, scale=scale), rtol=0, atol=0)
    other.join()


def test_a_new_pattern_met_while_another_thread_holds_on_falls_back_after_the_bounded_wait(monkeypatch):
    """A call in another thread that outlasts every `TRACE_TIME_WAIT` (as one waiting for the
    compile lock this compile holds would): each trace at trace time gives up instead of waiting
    on, the compiled call falls back to the slow call (a graph break), which traces once that
    call is over; the results hold."""
    from fxlora.runtime.forwards import GraphForward

    ours, reference = scalable_pair()
    x, scale = torch.randn(3, 8), torch.tensor(2.0)
    slow, original = [], GraphForward._slow_call

    @torch.compiler.disable
    def counted(self, *args, **kwargs):
        slow.append(type(self.root).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GraphForward, "_slow_call", counted)
    holding = threading.Event()

    def call_in_flight():  # outlasts the bounded waits; leaves once a writer has waited longer (the slow call)
        with CALL_LOCK.shared():
            holding.set()
            deadline, since = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                since = (since or time.monotonic()) if CALL_LOCK._waiting_writers else None
                if since is not None and time.monotonic() - since > compile_builds.TRACE_TIME_WAIT + 0.5:
                    break
                time.sleep(0.001)

    other = threading.Thread(target=call_in_flight)
    other.start()
    assert holding.wait(timeout=60)
    with torch.no_grad():
        got = torch.compile(ours.model, backend="eager")(x, scale=scale)
    other.join()
    torch.testing.assert_close(got, reference(x, scale=scale), rtol=0, atol=0)
    assert slow == ["Scalable"]  # the fallback, once
