"""Concurrent calls from threads: each call reads one whole adapter state, its own.

Threads really race here: every test starts its threads on a barrier and loops many calls while
others run (torch releases the GIL inside its kernels, so the threads interleave mid-forward).
"""

import copy
import threading

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.calls import Pin, SharedLock
from models import Mixed, row_by_row

ROUNDS = 60


def build(policy):
    torch.manual_seed(0)
    model = fxlora.transform(Mixed(), LoraConfig(target_modules=["stem", "blocks.1.0", "blocks.0.fc2"], init_lora_weights=False), trace=policy)
    model.add_adapter("b", LoraConfig(target_modules=["stem", "head"], r=4, lora_alpha=2, init_lora_weights=False))
    return model.eval()


def run_threads(*workers):
    """Run each worker in its own thread, all released at once; re-raise the first failure."""
    barrier = threading.Barrier(len(workers))
    errors = []

    def wrap(fn):
        def target():
            barrier.wait()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        return target

    threads = [threading.Thread(target=wrap(fn)) for fn in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_mixed_batches_in_two_threads_equal_single_thread_results(policy, grad):
    model = build(policy)
    x = torch.randn(5, 6)
    names = [["b", "default", "__base__", "b", "default"], ["__base__", "b", "b", "default", "__base__"]]
    with torch.set_grad_enabled(grad):
        want = [model(x, adapter_names=n).detach() for n in names]
        plain = model(x).detach()
    wrong = []

    def serve(i):
        def loop():
            with torch.set_grad_enabled(grad):
                for _ in range(ROUNDS):
                    out = model(x, adapter_names=names[i])
                    if grad:
                        out.sum().backward()
                    if not torch.equal(out.detach(), want[i]):
                        wrong.append(i)

        return loop

    run_threads(serve(0), serve(1))
    assert wrong == []
    with torch.set_grad_enabled(grad):
        assert torch.equal(model(x).detach(), plain)  # nothing of a mixed batch stayed behind
    torch.testing.assert_close(want[0], row_by_row(model, x, names[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_plain_calls_next_to_mixed_batches(policy):
    model = build(policy)
    x = torch.randn(5, 6)
    names = ["b", "b", "__base__", "default", "b"]
    with torch.no_grad():
        want_plain, want_mixed = model(x), model(x, adapter_names=names)
    wrong = []

    def plain():
        with torch.no_grad():
            for _ in range(ROUNDS):
                if not torch.equal(model(x), want_plain):
                    wrong.append("plain")

    def mixed():
        with torch.no_grad():
            for _ in range(ROUNDS):
                if not torch.equal(model(x, adapter_names=names), want_mixed):
                    wrong.append("mixed")

    run_threads(plain, mixed, plain)
    assert wrong == []


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_forward_racing_state_changes_sees_one_whole_state(policy):
    model = build(policy)
    model.set_adapter(["default", "b"])
    x = torch.randn(5, 6)
    with torch.no_grad():
        states = {"both": model(x)}
        model.set_adapter("b")
        states["b"] = model(x)
        with model.disable_adapter():
            states["off"] = model(x)
    assert not torch.equal(states["both"], states["b"]) and not torch.equal(states["b"], states["off"])
    stop = threading.Event()
    torn = []

    def switcher():
        for i in range(ROUNDS * 4):
            model.set_adapter(["default", "b"] if i % 2 else "b")
            if i % 3 == 0:
                with model.disable_adapter():
                    pass
        stop.set()

    def reader():
        with torch.no_grad():
            while not stop.is_set():
                out = model(x)
                if not any(torch.equal(out, want) for want in states.values()):
                    torn.append(out)

    run_threads(switcher, reader, reader)
    assert torn == []


def test_compiled_model_in_two_threads_with_mixed_batches():
    torch._dynamo.reset()
    model = build("auto")
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 6)
    names = [["b", "default", "__base__", "b"], ["default", "default", "b", "__base__"]]
    with torch.no_grad():
        want = [model(x, adapter_names=n) for n in names]
        for n in names:
            compiled(x, adapter_names=n)  # compile before racing
    wrong = []

    def serve(i):
        def loop():
            with torch.no_grad():
                for _ in range(ROUNDS // 2):
                    if not torch.allclose(compiled(x, adapter_names=names[i]), want[i], rtol=1e-5, atol=1e-6):
                        wrong.append(i)

        return loop

    run_threads(serve(0), serve(1))
    assert wrong == []
    torch._dynamo.reset()


def test_compiled_calls_do_not_examine_the_call_frame_again():
    """``LoraModel.forward`` (which takes the lock and the pin) stays out of torch.compile, while
    the model below it is compiled: after the first calls, a call is cache lookups only and dynamo
    examines no frame (it used to examine that forward on every call: about 0.1 ms), with or
    without mixed batches."""
    import torch._dynamo.utils as dynamo_utils

    if not hasattr(dynamo_utils, "curr_frame"):
        pytest.skip("this torch does not count the frames dynamo examines")
    torch._dynamo.reset()
    model = build("auto")
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 6)
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        for _ in range(2):
            plain, mixed = compiled(x), compiled(x, adapter_names=names)
        examined = dynamo_utils.curr_frame
        for _ in range(5):
            assert torch.equal(compiled(x), plain)
            assert torch.equal(compiled(x, adapter_names=names), mixed)
        assert dynamo_utils.curr_frame == examined
        assert torch.allclose(plain, model(x), rtol=1e-5, atol=1e-6) and torch.allclose(mixed, model(x, adapter_names=names), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_models_traced_while_other_threads_serve():
    """Tracing patches nn.Module.__call__ process-wide: it waits for calls in flight and calls
    wait for it, so a thread transforming (tracing) more models while others serve leaves their
    results exact, and its own models right."""
    model = build("auto")
    reference = copy.deepcopy(model)
    inputs = [torch.randn(5, 6), torch.randn(3, 6)]
    wrong = []

    def serve(x):
        def loop():
            with torch.no_grad():
                for _ in range(ROUNDS // 2):
                    if not torch.equal(model(x), reference(x)):
                        wrong.append(x.shape)

        return loop

    made = []

    def trace_more():
        for _ in range(6):
            made.append(build("auto"))
            made[-1].set_optimizations(fold_scaling=False)

    # reference is a separate model: its own forwards take the shared lock too
    run_threads(serve(inputs[0]), serve(inputs[1]), trace_more)
    assert wrong == []
    with torch.no_grad():
        for other in made:
            torch.testing.assert_close(other(inputs[0]), reference(inputs[0]), rtol=1e-5, atol=1e-6)


def test_shared_lock_exclusive_waits_for_shared_holders_and_upgrades_without_deadlock():
    lock = SharedLock()
    order = []
    inside = threading.Event()
    release = threading.Event()

    def holder():
        with lock.shared():
            inside.set()
            release.wait(5)
            order.append("shared done")

    def writer():
        inside.wait(5)
        with lock.exclusive():
            order.append("exclusive")

    t1, t2 = threading.Thread(target=holder), threading.Thread(target=writer)
    t1.start(), t2.start()
    inside.wait(5)
    t2.join(0.2)
    assert t2.is_alive()  # the writer waits while a shared holder is inside
    release.set()
    t1.join(5), t2.join(5)
    assert order == ["shared done", "exclusive"]

    # two threads each holding the lock shared both ask for it exclusively: no deadlock
    both_inside = threading.Barrier(2)
    done = []

    def upgrader():
        with lock.shared():
            both_inside.wait(5)
            with lock.exclusive():
                done.append(threading.get_ident())

    threads = [threading.Thread(target=upgrader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(done) == 2


def test_a_pins_call_memo_lives_for_the_outermost_call_of_its_thread():
    pin, made = Pin(), []

    def make():
        made.append(object())
        return made[-1]

    assert pin.call_memo(make) is None and made == []  # no call in flight
    with pin.hold("outer"):
        first = pin.call_memo(make)
        with pin.hold("inner"), pin.hold("replaced", replace=True):
            assert pin.call_memo(make) is first  # nested calls share it
        seen = []
        thread = threading.Thread(target=lambda: seen.append(pin.call_memo(make)))
        thread.start(), thread.join()
        assert seen == [None]  # another thread has no call in flight
    with pin.hold("next"):
        assert pin.call_memo(make) is not first and len(made) == 2  # a new call, a new memo
