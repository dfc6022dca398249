"""Hook tables of the modules a graph traced through (`fxlora.tracing.boundaries.hook_tables`):
found by walking only their part of the tree, and still found where one sits below a module
that is not among them."""

import torch.nn as nn

from fxlora.tracing.boundaries import hook_tables


def tree():
    root = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2)))
    root[0][0].register_forward_hook(lambda m, a, o: None)
    return root


def test_tables_of_a_traced_region_name_each_module_by_its_path():
    root = tree()
    modules = [root[0], root[0][0], root[0][1]]
    tables = hook_tables(root, modules, with_global=False)
    assert tables.paths == ("0", "0.0", "0.1")
    assert not tables.absent(root) and not tables.compiled_check(root)
    root[0][0]._forward_hooks.clear()
    assert tables.absent(root) and tables.compiled_check(root)


def test_a_module_below_one_not_listed_is_found_by_a_walk_of_the_whole_tree():
    root = tree()
    tables = hook_tables(root, [root[1][0], root[0][0]], with_global=False)  # their parents are not listed
    assert tables.paths == ("1.0", "0.0")
    assert not tables.absent(root) and not tables.compiled_check(root)
