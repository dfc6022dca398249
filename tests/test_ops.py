import torch

from fxlora.ops import stacked_linear_update


def reference(x, lora_a, lora_b, factors, base):
    out = base.clone()
    for a, b, (s, g) in zip(lora_a, lora_b, factors):
        gate = g.view(-1, *([1] * (x.dim() - 1))) if g.dim() else g
        out = out + (x @ a.T) @ b.T * (s * gate)
    return out


def weights(ranks=(2, 3, 4), width=6, out=5):
    torch.manual_seed(0)
    return [torch.randn(r, width) for r in ranks], [torch.randn(out, r) for r in ranks]


def test_equals_the_sum_of_per_adapter_updates_with_row_gates():
    lora_a, lora_b = weights()
    x, base = torch.randn(4, 7, 6), torch.randn(4, 7, 5)
    factors = [(torch.tensor(0.5), torch.tensor([1.0, 0, 0, 1])), (torch.tensor(2.0), torch.tensor([0.0, 1, 0, 0])), (torch.tensor(1.0), torch.tensor([0.0, 0, 1, 1]))]
    with torch.no_grad():
        torch.testing.assert_close(stacked_linear_update(x, lora_a, lora_b, factors, base), reference(x, lora_a, lora_b, factors, base))
    torch.testing.assert_close(stacked_linear_update(x, lora_a, lora_b, factors, base), reference(x, lora_a, lora_b, factors, base))


def test_stacked_weights_follow_in_place_changes_and_replacements():
    lora_a, lora_b = weights()
    x, base = torch.randn(3, 6), torch.zeros(3, 5)
    factors = [(torch.tensor(1.0), torch.tensor(1.0))] * 3
    with torch.no_grad():
        first = stacked_linear_update(x, lora_a, lora_b, factors, base)
        lora_a[1].mul_(3)  # in place: the cached stack is stale
        lora_b[2].zero_()
        torch.testing.assert_close(stacked_linear_update(x, lora_a, lora_b, factors, base), reference(x, lora_a, lora_b, factors, base))
        replaced = [torch.randn_like(a) for a in lora_a]  # new tensors, the first one included
        torch.testing.assert_close(stacked_linear_update(x, replaced, lora_b, factors, base), reference(x, replaced, lora_b, factors, base))
    assert not torch.allclose(first, reference(x, lora_a, lora_b, factors, base))


def test_gradients_reach_every_adapter_weight():
    lora_a, lora_b = weights()
    for w in lora_a + lora_b:
        w.requires_grad_(True)
    x, base = torch.randn(3, 6), torch.zeros(3, 5)
    factors = [(torch.tensor(1.0), torch.tensor(1.0))] * 3
    with torch.no_grad():  # a cached stack from a no-grad call must not cut the graph later
        stacked_linear_update(x, lora_a, lora_b, factors, base)
    stacked_linear_update(x, lora_a, lora_b, factors, base).square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in lora_a + lora_b)


def test_reused_scalings_and_row_gates_follow_changes():
    lora_a, lora_b = weights(ranks=(3, 3, 3))
    other_a, other_b = weights(ranks=(3, 3, 3), out=5)
    other_a = [a + 1 for a in other_a]
    x, base = torch.randn(4, 6), torch.zeros(4, 5)
    scalings = [torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.0)]
    gates = [torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.0, 1, 0, 0]), torch.tensor([0.0, 0, 1, 1])]
    with torch.no_grad():
        for _ in range(2):  # two "layers" sharing the gate tensors, twice
            for a, b in ((lora_a, lora_b), (other_a, other_b)):
                factors = list(zip(scalings, gates))
                torch.testing.assert_close(stacked_linear_update(x, a, b, factors, base), reference(x, a, b, factors, base))
        scalings[1].mul_(3)  # a scaling changed in place
        gates[0].zero_()  # a gate rewritten in place
        factors = list(zip(scalings, gates))
        torch.testing.assert_close(stacked_linear_update(x, lora_a, lora_b, factors, base), reference(x, lora_a, lora_b, factors, base))
        gates = [torch.tensor([0.0, 0, 0, 1])] * 3  # new gate tensors (the next mixed batch)
        factors = list(zip(scalings, gates))
        torch.testing.assert_close(stacked_linear_update(x, lora_a, lora_b, factors, base), reference(x, lora_a, lora_b, factors, base))


def test_inference_tensors_are_used_without_reuse():
    lora_a, lora_b = weights(ranks=(2, 2, 2))
    x, base = torch.randn(4, 6), torch.zeros(4, 5)
    with torch.inference_mode():  # gates made here have no version counter
        gates = [torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.0, 1, 0, 0]), torch.tensor([0.0, 0, 1, 1])]
        factors = [(torch.tensor(1.5), g) for g in gates]
        got = stacked_linear_update(x, lora_a, lora_b, factors, base)
    torch.testing.assert_close(got, reference(x, lora_a, lora_b, factors, base))


def test_grouped_update_adds_each_groups_adapter_to_its_rows_only():
    from fxlora.ops import _grouped_stacks, grouped_linear_update

    lora_a, lora_b = weights(ranks=(2, 4))  # ranks padded to 4 in the stacks
    scalings = [torch.tensor(0.5), torch.tensor(3.0)]
    x, base = torch.randn(5, 2, 6), torch.randn(5, 2, 5)  # rows, positions, features
    # adapter 0 on row 3 (padded with row 3 again, factor 0), adapter 1 on rows 0 and 4 (scale 2)
    index = torch.tensor([3, 3, 0, 4])
    factors = torch.tensor([[1.0], [0.0], [2.0], [2.0]]).view(2, 2, 1)
    got = grouped_linear_update(x, base, _grouped_stacks(lora_a + lora_b + scalings), index, factors)
    expected = base.clone()
    expected[3] += (x[3] @ lora_a[0].T) @ lora_b[0].T * 0.5
    for row in (0, 4):
        expected[row] += (x[row] @ lora_a[1].T) @ lora_b[1].T * 3.0 * 2.0
    torch.testing.assert_close(got, expected)


def test_served_mixed_batches_follow_weight_changes():
    """The stacks kept between serving calls are rebuilt when a weight changes in place or is
    replaced."""
    import fxlora

    torch.manual_seed(0)
    model = fxlora.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), fxlora.LoraConfig(target_modules=["0"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", fxlora.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    model.eval()
    x, names = torch.randn(3, 4), ["a", "b", "__base__"]

    def row_by_row():
        model.set_adapter("a")
        first = model(x[:1])
        model.set_adapter("b")
        second = model(x[1:2])
        with model.disable_adapter():
            third = model(x[2:])
        return torch.cat([first, second, third])

    with torch.no_grad():
        before = model(x, adapter_names=names)
        model.get_submodule("0.lora_B.b").weight.mul_(-3)  # in place
        torch.testing.assert_close(model(x, adapter_names=names), row_by_row())
        model.get_submodule("0.lora_A.a").weight = torch.nn.Parameter(torch.randn(8, 4))  # replaced
        torch.testing.assert_close(model(x, adapter_names=names), row_by_row())
    assert not torch.allclose(before, row_by_row())
