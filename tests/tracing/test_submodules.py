"""`fxlora.tracing.submodules.submodule` finds what ``get_submodule`` finds, and raises as it does."""

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from fxlora.tracing.submodules import named_submodules, submodule


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


@given(st.lists(st.integers(1, 3), min_size=0, max_size=3), st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=4), st.integers(0, 3))
def test_named_submodules_lists_what_named_modules_lists(shape, shares, holes):
    """Same paths, same modules, same order, shared modules once under their first path, holes
    skipped."""
    root = tree(shape)
    modules = list(root.modules())
    for i, j in shares:  # a module registered a second time elsewhere in the tree
        owner, shared = modules[i % len(modules)], modules[j % len(modules)]
        if shared is not root and owner is not shared:
            owner.register_module(f"shared{j}", shared)
    for k in range(holes):
        modules[k % len(modules)].register_module(f"hole{k}", None)
    assert [(p, id(m)) for p, m in named_submodules(root)] == [(p, id(m)) for p, m in root.named_modules()]


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=4),
    st.lists(st.integers(0, 40), max_size=3),
)
def test_closed_paths_are_listed_but_not_walked_into(shape, shares, closing):
    """named_modules' walk (each module once, under its first path, in its order) that lists a
    module at a closed path but does not go into it: without shared modules, named_modules less
    what is below the closed paths."""
    root = tree(shape)
    modules = list(root.modules())
    for i, j in shares:
        owner, shared = modules[i % len(modules)], modules[j % len(modules)]
        if shared is not root and owner is not shared:
            owner.register_module(f"shared{j}", shared)
    paths = [p for p, _ in root.named_modules()]
    closed = tuple(sorted({paths[k % len(paths)] for k in closing} - {""}))
    expected, seen = [], set()

    def visit(path, module):
        if id(module) not in seen:
            seen.add(id(module))
            expected.append((path, id(module)))
            if path not in closed:
                for name, child in module._modules.items():
                    if child is not None:
                        visit(f"{path}.{name}" if path else name, child)

    visit("", root)
    assert [(p, id(m)) for p, m in named_submodules(root, closed)] == expected
    if not shares:
        below = tuple(c + "." for c in closed)
        assert expected == [(p, id(m)) for p, m in root.named_modules() if not p.startswith(below)]


def test_a_tree_that_lists_its_modules_its_own_way_is_left_to_named_modules():
    class Listing(nn.Sequential):
        def named_modules(self, memo=None, prefix="", remove_duplicate=True):
            yield prefix, self  # hides its children

    class Equal(nn.Linear):
        def __eq__(self, other):  # every Equal is one module to a set
            return isinstance(other, Equal)

        __hash__ = nn.Linear.__hash__

    for root in (nn.Sequential(nn.Linear(2, 2), Listing(nn.ReLU())), nn.Sequential(Equal(2, 2), Equal(2, 2))):
        assert [(p, id(m)) for p, m in named_submodules(root)] == [(p, id(m)) for p, m in root.named_modules()]


# ---------------------------------------------------------------------- trees_fixed
def counting_walks(monkeypatch):
    from fxlora.tracing import submodules

    walks = []
    original = submodules._walk
    monkeypatch.setattr(submodules, "_walk", lambda root, *closed: walks.append(root) or original(root, *closed))
    return walks


def test_while_fixed_each_tree_is_walked_once_and_outside_every_time(monkeypatch):
    from fxlora.tracing.submodules import trees_fixed

    root = tree([2, 2])
    walks = counting_walks(monkeypatch)
    with trees_fixed():
        with trees_fixed():  # nested: the outer table stays
            first = named_submodules(root)
        assert named_submodules(root) is first
        assert named_submodules(root[0]) == list(root[0].named_modules())  # another root: its own walk
    assert walks == [root, root[0]]
    assert first == list(root.named_modules())
    root.append(nn.Linear(2, 2))  # outside: the changed tree is seen
    assert named_submodules(root) == list(root.named_modules()) != first
    assert len(walks) == 3
