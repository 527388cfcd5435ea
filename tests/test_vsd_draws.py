"""VSD step draws (wadi_core/vsd/draws.py): keyed per sample, a batch's draws do not depend on how the
global batch is cut between ranks; from one generator, they are the generator's own draws."""

import pytest
import torch

from wadi_core.vsd.draws import GeneratorDraws, KeyedDraws, sample_seed

CPU = torch.device("cpu")
SHAPE = (4, 8, 8)


def _step_draws(draws, n: int) -> list[torch.Tensor]:
    """The draw sequence of one VSD step with one fake update: z, t, noise, t_f, noise_f, coins."""
    return [draws.normal((n, *SHAPE), CPU), draws.integers(20, 980, n, CPU), draws.normal((n, *SHAPE), CPU),
            draws.integers(0, 1000, n, CPU), draws.normal((n, *SHAPE), CPU), draws.uniform(n, CPU)]


@pytest.mark.parametrize("cuts", [[6], [3, 3], [2, 2, 2], [1, 4, 1]])
def test_keyed_draws_of_a_global_batch_do_not_depend_on_the_cut(cuts):
    whole = _step_draws(KeyedDraws(seed=7, epoch=2, indices=range(60, 66)), 6)
    parts, start = [], 60
    for n in cuts:  # each "rank" draws for its slice of the global batch, in the same call order
        parts.append(_step_draws(KeyedDraws(seed=7, epoch=2, indices=range(start, start + n)), n))
        start += n
    for k, full in enumerate(whole):
        assert torch.equal(torch.cat([p[k] for p in parts]), full)


def test_keys_separate_samples_epochs_and_seeds():
    base = KeyedDraws(1, 0, [5]).normal((1, *SHAPE), CPU)
    for other in (KeyedDraws(1, 0, [6]), KeyedDraws(1, 1, [5]), KeyedDraws(2, 0, [5])):
        assert not torch.equal(other.normal((1, *SHAPE), CPU), base)
    assert sample_seed(1, 0, 5) != sample_seed(1, 0, 6) and 0 <= sample_seed(1, 0, 5) < 2 ** 63


def test_keyed_draws_refuse_a_batch_of_another_size():
    with pytest.raises(ValueError, match="a draw for 3 samples from KeyedDraws over 2 sample keys"):
        KeyedDraws(0, 0, [0, 1]).normal((3, *SHAPE), CPU)
    with pytest.raises(ValueError, match="at least one sample"):
        KeyedDraws(0, 0, [])


def test_generator_draws_are_the_generators_own():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = _step_draws(GeneratorDraws(g1), 5)
    want = [torch.randn((5, *SHAPE), generator=g2), torch.randint(20, 980, (5,), generator=g2),
            torch.randn((5, *SHAPE), generator=g2), torch.randint(0, 1000, (5,), generator=g2),
            torch.randn((5, *SHAPE), generator=g2), torch.rand(5, generator=g2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
