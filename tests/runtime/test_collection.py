"""The cyclic collector is paused while fxlora plans and builds (`fxlora.runtime.collection`),
and runs again afterwards: after an error too, after overlapping pauses in threads only when
the last one ends, never when the program had turned it off."""

import gc
import threading

import pytest
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.collection import collection_paused
from models import MLP


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_running_after_even_after_an_error():
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():  # nested
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_the_program_turned_off_stays_off():
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_pauses_in_threads_resume_when_the_last_ends():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with collection_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with collection_paused():
            second_in.set()
            first_out.wait(5)
            seen["after the first ended"] = gc.isenabled()
        seen["after both ended"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first ended": False, "after both ended": True}


def test_transform_and_add_adapter_plan_with_the_collector_paused(monkeypatch):
    import fxlora.model.adapters as adapters
    import fxlora.model.lora_model as lora_model

    states = []
    for module in (lora_model, adapters):
        real = module.make_plan
        monkeypatch.setattr(module, "make_plan", lambda *a, _real=real, **k: (states.append(gc.isenabled()), _real(*a, **k))[1])
    model = fxlora.transform(MLP(), LoraConfig(target_modules=["seq.0"]))
    model.add_adapter("other", LoraConfig(target_modules=["seq.2"]))
    assert states == [False, False] and gc.isenabled()
    with pytest.raises(ValueError):
        fxlora.transform(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["nothing_matches"]))
    assert gc.isenabled()
