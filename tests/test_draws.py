"""Per-example random draws (trainables/draws.py) and the model's keyed drop-path: an example's draws depend on the
key, the step and its own index only."""

from __future__ import annotations

import torch
from conftest import TINY_VAR
from torch.utils._python_dispatch import TorchDispatchMode

from trainables.data.tokens import TokenViews
from trainables.draws import ExampleKey, example_draws
from trainables.models import build_var


def test_an_examples_draws_do_not_depend_on_the_rest_of_the_batch():
    key = ExampleKey.from_entropy()
    alone = example_draws(key, torch.tensor([7]), step=3, num_views=5, k=2, drop_path_branches=4)
    for batch in ([7, 1, 2], [0, 9, 7], list(range(100))):
        drawn = example_draws(key, torch.tensor(batch), step=3, num_views=5, k=2, drop_path_branches=4)
        row = batch.index(7)
        assert torch.equal(drawn.views_bV[row], alone.views_bV[0]) and torch.equal(
            drawn.label_b[row], alone.label_b[0]
        )
        assert torch.equal(
            drawn.drop_path_RD[2 * row : 2 * row + 2], alone.drop_path_RD
        )  # its k rows, example-major
    other_step = example_draws(key, torch.tensor([7]), step=4, num_views=5, k=2, drop_path_branches=4)
    other_key = example_draws(
        ExampleKey.from_entropy(), torch.tensor([7]), step=3, num_views=5, k=2, drop_path_branches=4
    )
    assert not torch.equal(other_step.views_bV, alone.views_bV) and not torch.equal(
        other_key.views_bV, alone.views_bV
    )
    assert "key=" not in repr(key) and key.secret and not ExampleKey.from_seed(0).secret


def test_draws_are_uniform_and_independent_across_examples_slots_and_steps():
    key = ExampleKey.from_seed(0)
    u = key.uniform(torch.arange(50_000), step=0, purpose="views", count=8)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=50, min=0, max=1)
    expected = u.numel() / 50
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 49 + 5 * (2 * 49) ** 0.5  # 49 degrees of freedom, five standard deviations
    flat_next = key.uniform(torch.arange(50_000), step=1, purpose="views", count=8)
    for a, b in (
        (u[:-1, 0], u[1:, 0]),
        (u[:, 0], u[:, 1]),
        (u[:, 0], flat_next[:, 0]),
    ):  # neighbours, slots, steps
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.02
    assert torch.equal(
        ExampleKey.from_seed(0).uniform(torch.tensor([3]), step=0, purpose="views", count=8), u[3:4]
    )


def test_token_views_take_the_k_views_with_the_smallest_uniforms():
    views = (torch.arange(12).view(2, 3, 2),)  # 2 examples, 3 views, 2 tokens
    data = TokenViews(torch.tensor([0, 1]), views)
    _, (picked,) = data.take(torch.tensor([1]), k=2, uniform_bV=torch.tensor([[0.9, 0.1, 0.5]]))
    assert picked.tolist() == [[[8, 9], [10, 11]]]  # views 1 then 2 of example 1


class _DeviceCopies(TorchDispatchMode):
    """Records every copy of a tensor to another device: (source device, target device, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("device")
        if (
            func is torch.ops.aten._to_copy.default
            and target is not None
            and torch.device(target) != args[0].device
        ):
            self.copies.append(
                (args[0].device.type, torch.device(target).type, kwargs.get("non_blocking", False))
            )
        return func(*args, **kwargs)


def test_a_batch_s_token_maps_reach_the_device_in_two_copies_that_do_not_wait_for_it():
    """A plain ``.to(cuda)`` of a host tensor synchronises the stream: one per scale made every step wait for the
    last one's kernels. ``take`` sends the labels and every scale's maps in one copy each, asynchronous ("meta"
    stands in for the GPU: no copy may block), and gives the maps the per-scale gather's values, as int64."""
    patch_nums = (1, 2, 3, 4)
    views = tuple(torch.randint(0, 4096, (6, 3, pn * pn), dtype=torch.int16) for pn in patch_nums)
    data = TokenViews(torch.tensor([5, 4, 3, 2, 1, 0]), views)
    indices, uniform_bV = torch.tensor([4, 1, 2]), torch.rand(3, 3)
    pick_bk = uniform_bV.argsort(dim=1)[:, :2]
    labels_b, maps = data.take(indices, k=2, uniform_bV=uniform_bV)
    assert labels_b.tolist() == [1, 4, 3]
    for got, v in zip(maps, views):
        assert got.dtype == torch.long and torch.equal(got, v[indices[:, None], pick_bk].long())
    with _DeviceCopies() as mode:
        labels_b, maps = data.take(indices, k=2, uniform_bV=uniform_bV, device="meta")
    assert mode.copies == [("cpu", "meta", True)] * 2
    assert labels_b.device.type == "meta" and [tuple(m.shape) for m in maps] == [
        (3, 2, pn * pn) for pn in patch_nums
    ]
    assert all(m.dtype == torch.long and m.device.type == "meta" for m in maps)


def test_keyed_drop_path_drops_rows_independently_and_leaves_the_global_generator_alone():
    var = build_var(
        **{**TINY_VAR, "depth": 3}, drop_path_rate=0.5, generator=torch.Generator().manual_seed(0)
    ).train()
    label_B = torch.tensor([1, 2, 3])
    x_BLC = torch.randn(3, var.seq_len - var.first_l, TINY_VAR["z_channels"])
    u_BD = ExampleKey.from_seed(1).uniform(torch.arange(3), step=0, purpose="drop_path", count=2 * var.depth)
    rng = torch.get_rng_state()
    together = var(label_B, x_BLC, drop_path_uniform_BD=u_BD)
    assert torch.equal(torch.get_rng_state(), rng)
    for b in range(3):
        torch.testing.assert_close(
            var(label_B[b : b + 1], x_BLC[b : b + 1], drop_path_uniform_BD=u_BD[b : b + 1]),
            together[b : b + 1],
        )
    torch.testing.assert_close(
        var(label_B, x_BLC, drop_path_uniform_BD=u_BD), together
    )  # the uniforms decide, nothing else
    keep_all, drop_all = (
        var(label_B, x_BLC, drop_path_uniform_BD=torch.full_like(u_BD, value)) for value in (0.0, 0.99)
    )
    assert not torch.allclose(keep_all, drop_all) and not torch.allclose(keep_all, together)
    no_drop = build_var(
        **{**TINY_VAR, "depth": 3}, drop_path_rate=0.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        no_drop.train()(label_B, x_BLC, drop_path_uniform_BD=u_BD), no_drop.eval()(label_B, x_BLC)
    )
