"""Flag dicts of handle arguments (transformers' ``EncoderDecoderCache.is_updated``): their
contents are part of the call pattern, reads are constants, writes are nodes on the real dict."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.tracing.integrations import Flags, object_kind_of_type, register_object_type
from models import copy_peft_adapter_weights

peft = pytest.importorskip("peft")


class Box:
    """A handle with a flag dict, and a method that may change it."""

    def __init__(self) -> None:
        self.done: dict[int, bool] = {}

    def reset(self, x):
        self.done.clear()
        return x


register_object_type(Box, attributes=("reset",), flags=("done",))


class UsesBox(nn.Module):
    def __init__(self, reset_first: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.reset_first = reset_first

    def forward(self, x, box=None):
        y = self.lin(x)
        if box is None:
            return y
        if self.reset_first:
            y = box.reset(y)
        if box.done.get(0):
            return 2 * y
        box.done[0] = True
        return y


def paired(base):
    kwargs = dict(target_modules=["lin"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs)).eval()
    copy_peft_adapter_weights(reference, ours)
    return reference, ours


def test_flags_join_the_pattern_and_writes_reach_the_real_dict(eager_fallbacks):
    torch.manual_seed(0)
    reference, ours = paired(UsesBox())
    x = torch.rand(2, 4)
    ours_box, peft_box = Box(), Box()
    with torch.no_grad():
        for _ in range(3):  # first call computes and sets the flag; later calls take the other branch
            torch.testing.assert_close(ours(x, ours_box), reference(x, peft_box), rtol=0, atol=1e-6)
            assert ours_box.done == peft_box.done == {0: True}
    assert eager_fallbacks == []  # each flag state got its own graph
    kind = object_kind_of_type(Box)
    assert kind.member_types(ours_box) == (("done", Flags(((0, True),))),)


def test_flags_read_after_the_handle_was_passed_on_are_not_trusted(eager_fallbacks):
    torch.manual_seed(1)
    reference, ours = paired(UsesBox(reset_first=True))
    x = torch.rand(2, 4)
    ours_box, peft_box = Box(), Box()
    ours_box.done[0] = peft_box.done[0] = True  # reset() clears it: a constant read would be stale
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ours_box), reference(x, peft_box), rtol=0, atol=1e-6)
    assert ours_box.done == peft_box.done == {0: True}
    assert eager_fallbacks == ["UsesBox"]  # that pattern does not trace: the call ran eagerly, exactly
