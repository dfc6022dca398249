"""`fxlora.tracing.submodules.submodule` finds what ``get_submodule`` finds, and raises as it does."""

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from fxlora.tracing.submodules import submodule


def tree(shape: list[int]) -> nn.Module:
    """A tree of Sequentials and Linears, `shape` children per level."""
    if not shape:
        return nn.Linear(2, 2)
    return nn.Sequential(*[tree(shape[1:]) for _ in range(shape[0])])


@given(st.lists(st.integers(1, 3), min_size=0, max_size=3))
def test_every_path_of_named_modules_is_found(shape):
    root = tree(shape)
    for path, module in root.named_modules():
        assert submodule(root, path) is module is root.get_submodule(path)


def test_other_paths_behave_as_get_submodule():
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    root.register_module("hole", None)
    for path in ["2", "0.weight", "1.0.x", "hole", "hole.x"]:
        with pytest.raises(AttributeError) as ours:
            submodule(root, path)
        with pytest.raises(AttributeError) as theirs:
            root.get_submodule(path)
        assert str(ours.value) == str(theirs.value)


def test_a_module_reached_as_an_attribute_is_found_as_get_submodule_finds_it():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

        @property
        def alias(self) -> nn.Module:  # no registered child: get_submodule's getattr finds it
            return self.inner

    root = nn.Sequential(Holder())
    assert submodule(root, "0.alias") is root.get_submodule("0.alias") is root[0].inner
