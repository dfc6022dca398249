import torch

from fxlora.core.ops import stacked_linear_update


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


def test_gradients_reach_every_adapter_weight():
    lora_a, lora_b = weights()
    for w in lora_a + lora_b:
        w.requires_grad_(True)
    x, base = torch.randn(3, 6), torch.zeros(3, 5)
    factors = [(torch.tensor(1.0), torch.tensor([1.0, 0.0, 2.0]))] * 3
    stacked_linear_update(x, lora_a, lora_b, factors, base).square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in lora_a + lora_b)


def test_grouped_update_adds_each_groups_adapter_to_its_rows_only():
    from fxlora.core.ops import grouped_linear_update

    lora_a, lora_b = weights(ranks=(2, 4))
    x, base = torch.randn(5, 2, 6), torch.randn(5, 2, 5)  # rows, positions, features
    # adapter 0 on row 3 with factor 0.5, adapter 1 on rows 0 and 4 with factor 6
    index = (torch.tensor([3]), torch.tensor([0, 4]))
    kept = base.clone()
    got = grouped_linear_update(x, base, (lora_a, lora_b), index, [0.5, 6.0])
    expected = base.clone()
    expected[3] += (x[3] @ lora_a[0].T) @ lora_b[0].T * 0.5
    for row in (0, 4):
        expected[row] += (x[row] @ lora_a[1].T) @ lora_b[1].T * 6.0
    torch.testing.assert_close(got, expected)
    assert torch.equal(base, kept)  # base itself is not written


def test_grouped_update_computes_in_the_adapters_dtype_and_rounds_once():
    from fxlora.core.ops import grouped_linear_update

    lora_a, lora_b = weights(ranks=(3,))
    x, base = torch.randn(4, 6).bfloat16(), torch.randn(4, 5).bfloat16()
    got = grouped_linear_update(x, base, (lora_a, lora_b), (torch.tensor([1, 2]),), [2.0])
    expected = base.float()
    expected[1:3] += (x[1:3].float() @ lora_a[0].T) @ lora_b[0].T * 2.0
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.bfloat16())
