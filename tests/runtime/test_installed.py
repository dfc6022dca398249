"""The registry of fxlora's forwards on modules: any installed kind is found, uninstalling gives
the module back its forward, and the live graph roots of a class are found per model, weakly."""

import gc
import pickle

import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.forwards import EagerLoraForward, GraphForward
from fxlora.runtime.installed import install, installed_forward, installs, live_roots, uninstall
from models import Block, Blocks


def adapted():
    return fxlora.transform(Blocks(n=3), LoraConfig(target_modules=["fc1", "fc2"]))


def test_every_installed_kind_is_found_and_nothing_else():
    model = adapted()
    assert model.graph_roots == [""]
    assert isinstance(installed_forward(model.model), GraphForward)
    assert isinstance(installed_forward(model.model.blocks[0].fc1), EagerLoraForward)
    assert installed_forward(model.model.blocks[0]) is None
    plain = nn.Linear(2, 2)
    plain.forward = lambda x: x  # an instance forward of the user's own
    assert installed_forward(plain) is None and installed_forward(model.model.head) is None


def test_a_registered_kind_installs_and_uninstalls_back_to_the_previous_forward(monkeypatch):
    from fxlora.runtime import installed

    monkeypatch.setattr(installed, "_KINDS", installed._KINDS)  # the registration is undone after the test

    @installs
    class Stamp:
        def __init__(self, previous):
            self.previous = previous

        def __call__(self, x):
            return x + 1

    module = nn.Identity()
    own = module.forward = lambda x: x * 2  # noqa: E731 - the user's instance forward
    install(module, Stamp(own))
    assert isinstance(installed_forward(module), Stamp) and torch.equal(module(torch.ones(1)), torch.full((1,), 2.0))
    uninstall(module)
    assert module.__dict__["forward"] is own
    install(module, Stamp(None))
    uninstall(module)
    assert "forward" not in module.__dict__


def test_live_roots_are_found_per_model_and_forgotten_with_it():
    first, second = adapted(), adapted()
    roots = lambda model: {id(installed_forward(model.model))}  # noqa: E731
    assert {id(f) for f in live_roots(Blocks, first.adapter_state)} == roots(first)
    assert roots(first) | roots(second) <= {id(f) for f in live_roots(Blocks)}
    assert live_roots(Block, first.adapter_state) == []  # no block of its is a root of its own
    clone = pickle.loads(pickle.dumps(second))  # unpickled roots are tracked too
    assert {id(f) for f in live_roots(Blocks, clone.adapter_state)} == roots(clone)
    gone = roots(second) | roots(clone)
    del second, clone
    gc.collect()
    assert not gone & {id(f) for f in live_roots(Blocks)}


def test_roots_made_in_threads_while_others_look_for_roots_are_all_found():
    """Unpickling makes roots (tracked) in several threads while others list the live roots."""
    import threading

    model = adapted()
    blob = pickle.dumps(model)
    made, errors, stop = [], [], threading.Event()

    def make():
        try:
            for _ in range(20):
                made.append(pickle.loads(blob))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def look():
        try:
            while not stop.is_set():
                live_roots(Blocks)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    makers = [threading.Thread(target=make) for _ in range(3)]
    lookers = [threading.Thread(target=look) for _ in range(2)]
    for t in makers + lookers:
        t.start()
    for t in makers:
        t.join(timeout=120)
    stop.set()
    for t in lookers:
        t.join(timeout=120)
    assert errors == [] and len(made) == 60
    found = {id(f) for f in live_roots(Blocks)}
    assert all(id(installed_forward(m.model)) in found for m in made)
