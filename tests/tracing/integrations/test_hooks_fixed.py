"""`hooks_fixed`: while planning, `hooks_for` walks each module's tree once; outside it, and on
other threads, every question walks the tree as it is."""

import threading

import pytest
import torch.nn as nn

from fxlora.tracing import integrations
from fxlora.tracing.integrations import NO_HOOKS, hooks_fixed, hooks_for


def counting(monkeypatch):
    walks = []
    original = integrations.libraries_of
    monkeypatch.setattr(integrations, "libraries_of", lambda modules: walks.append(1) or original(modules))
    return walks


def test_each_module_is_walked_once_while_fixed_and_every_time_outside(monkeypatch):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    walks = counting(monkeypatch)
    with hooks_fixed():
        with hooks_fixed():  # nested: the outer table stays
            first = hooks_for(model)
        assert hooks_for(model) is first and hooks_for(model.blocks[0]) is first
    assert len(walks) == 2  # the model once, its block once
    assert first is not NO_HOOKS
    hooks_for(model), hooks_for(model)
    assert len(walks) == 4


def test_outside_a_fixed_pass_a_changed_tree_is_seen(monkeypatch):
    timm = pytest.importorskip("timm")
    holder = nn.Sequential(nn.Linear(2, 2))
    assert hooks_for(holder) is NO_HOOKS
    with hooks_fixed():
        assert hooks_for(holder) is NO_HOOKS
    holder.append(timm.layers.Mlp(2, 2))
    assert hooks_for(holder) is not NO_HOOKS


def test_other_threads_do_not_share_the_table(monkeypatch):
    holder = nn.Sequential(nn.Linear(2, 2))
    walks = counting(monkeypatch)
    entered, done = threading.Event(), threading.Event()

    def planning():
        with hooks_fixed():
            hooks_for(holder)
            entered.set()
            done.wait(10)

    thread = threading.Thread(target=planning)
    thread.start()
    assert entered.wait(10)
    hooks_for(holder), hooks_for(holder)  # this thread has no table: two walks
    done.set()
    thread.join()
    assert len(walks) == 3
