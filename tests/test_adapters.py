"""Table-driven adapter checks (PEFT style): (tiny model) x (adapter kind) through the same checks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from wadi_core.adapters import (AdaptedLinear, adapter_modules, adapter_parameters, adapter_state_dict,
                                add_adapter, count_trainable, load_adapter, load_adapter_state_dict,
                                merge_adapter, remove_adapters, save_adapter, set_adapter, unmerge_adapter,
                                use_adapter)
from wadi_core.adapters.lorad import lorad_linear, rotate_pairs

KINDS = ["lorad", "lora", "dora", "full"]


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    run: Callable[[nn.Module, tuple], torch.Tensor]
    targets: object
    rank: int


def _stack() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8, bias=False), nn.GELU(), nn.Linear(8, 6))


def _tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def _tiny_pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        patch_size=2, caption_channels=24, cross_attention_dim=16, norm_type="ada_norm_single",
        use_additional_conditions=False)


def _unet_run(m: nn.Module, inp: tuple) -> torch.Tensor:
    x, t, c = inp
    return m(x, t, encoder_hidden_states=c).sample


def _pixart_run(m: nn.Module, inp: tuple) -> torch.Tensor:
    x, t, c = inp
    return m(x, encoder_hidden_states=c, timestep=t,
             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


CASES = [
    Case("stack", _stack, lambda g: (torch.randn(3, 5, 12, generator=g),), lambda m, i: m(*i), "re:\\d+", 4),
    Case("unet", _tiny_unet,
         lambda g: (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)),
         _unet_run, "unet_student", 4),
    Case("pixart", _tiny_pixart,
         lambda g: (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 24, generator=g)),
         _pixart_run, "dit_student", 4),
]
TABLE = [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in KINDS]


def _rank(case: Case, kind: str) -> int:
    return 0 if kind == "full" else case.rank  # full fine-tuning has no rank


def _setup(case: Case, kind: str, names: tuple[str, ...] = ("a",)) -> tuple[nn.Module, nn.Module, tuple]:
    torch.manual_seed(0)
    base = case.build().eval()
    model = copy.deepcopy(base)
    for n in names:
        add_adapter(model, kind, n, _rank(case, kind), case.targets)
    return base, model, case.inputs(torch.Generator().manual_seed(1))


@torch.no_grad()
def _perturb(model: nn.Module, name: str, scale: float = 0.3) -> None:
    """Move the adapter away from its identity init so merge/grad checks are not vacuous."""
    for p in adapter_parameters(model, name):
        p.add_(scale * torch.randn_like(p) * (p.abs().mean() + 0.1))


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


@pytest.mark.parametrize("case,kind", TABLE)
def test_identity_at_init(case: Case, kind: str) -> None:
    base, model, inp = _setup(case, kind)
    with torch.no_grad():
        ref = case.run(base, inp)
        with use_adapter(model, "a"):
            out = case.run(model, inp)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert {k for k in model.state_dict() if ".adapters." not in k} == set(base.state_dict())


@pytest.mark.parametrize("case,kind", TABLE)
def test_merge_equals_unmerged_and_unmerge_restores(case: Case, kind: str) -> None:
    base, model, inp = _setup(case, kind)
    _perturb(model, "a")
    before = _base_state(model)
    set_adapter(model, "a")
    with torch.no_grad():
        plain = case.run(base, inp)
        unmerged = case.run(model, inp)
        assert (unmerged - plain).abs().max() > 1e-4, "perturbed adapter should change the output"
        merge_adapter(model, "a")
        changed = [k for k, v in _base_state(model).items() if not torch.equal(v, before[k])]
        assert changed, "merge should write into the base weights"
        merged = case.run(model, inp)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match="merged"):
            set_adapter(model, None)
        unmerge_adapter(model, "a")
        for k, v in _base_state(model).items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
        set_adapter(model, None)
        torch.testing.assert_close(case.run(model, inp), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,kind", TABLE)
def test_save_load_round_trip(case: Case, kind: str, tmp_path) -> None:
    base, model, inp = _setup(case, kind)
    _perturb(model, "a")
    path = tmp_path / "a.safetensors"
    save_adapter(model, "a", path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, "student", path)  # adds the adapter from the file's metadata
    assert count_trainable(fresh, "student") == count_trainable(model, "a")
    with torch.no_grad(), use_adapter(model, "a"), use_adapter(fresh, "student"):
        torch.testing.assert_close(case.run(fresh, inp), case.run(model, inp), rtol=0, atol=0)
    state = adapter_state_dict(model, "a")
    other = copy.deepcopy(base)
    add_adapter(other, kind, "b", _rank(case, kind), case.targets)
    load_adapter_state_dict(other, "b", state)
    for k, v in adapter_state_dict(other, "b").items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("case,kind", TABLE)
def test_gradients_only_into_active_adapter(case: Case, kind: str) -> None:
    _, model, inp = _setup(case, kind, names=("a", "b"))
    _perturb(model, "a")
    _perturb(model, "b")
    before = _base_state(model)
    assert count_trainable(model) == count_trainable(model, "a") + count_trainable(model, "b")
    opt = torch.optim.SGD(adapter_parameters(model, "a"), lr=0.1)
    set_adapter(model, "a")
    case.run(model, inp).square().mean().backward()
    grads = [p.grad for p in adapter_parameters(model, "a")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in adapter_parameters(model, "b"))
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    opt.step()
    for name in ("b", None, "a"):  # switching adapters never touches the base
        set_adapter(model, name)
        with torch.no_grad():
            case.run(model, inp)
    after = _base_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    mods = adapter_modules(model, "a")
    assert {id(p) for p in mods.parameters()} == {id(p) for p in adapter_parameters(model, "a")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_remove_adapters_gives_plain_linears(case: Case) -> None:
    base, model, inp = _setup(case, "lorad")
    _perturb(model, "a")
    set_adapter(model, "a")
    with torch.no_grad():
        want = case.run(model, inp)
    merge_adapter(model, "a")
    remove_adapters(model)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(case.run(model, inp), want, rtol=1e-4, atol=1e-5)


# --- LoRaD specifics -----------------------------------------------------------------------------


def _independent_rotation(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent column pair as a complex number times exp(i theta) (independent of the code)."""
    z = torch.complex(w[:, 0::2].double(), w[:, 1::2].double()) * torch.polar(torch.ones_like(theta.double()),
                                                                               theta.double())
    out = torch.empty(w.shape, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def _random_lorad_layer(out_f: int = 24, in_f: int = 40, rank: int = 6) -> tuple[nn.Module, AdaptedLinear]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    add_adapter(model, "lorad", "a", rank, ["0"])
    layer = model[0]
    with torch.no_grad():
        layer.adapters["a"].A.normal_(0, 1.0)
    return model, layer


def test_lorad_keeps_row_norms_and_matches_rotation_formula() -> None:
    model, layer = _random_lorad_layer()
    ad = layer.adapters["a"]
    theta = (ad.A.double() @ ad.B.double())
    assert theta.abs().max() > 0.5, "angles should be large for a meaningful test"
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 3, 40)
    set_adapter(model, "a")
    with torch.no_grad():
        y = model(x)
    w_rot = _independent_rotation(w0, theta)
    want = x.double() @ w_rot.T + layer.bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    merge_adapter(model, "a")
    merged = layer.weight.detach()
    torch.testing.assert_close(merged.norm(dim=1), w0.norm(dim=1), rtol=1e-5, atol=0)
    assert (merged - w0).abs().max() > 1e-2
    unmerge_adapter(model, "a")
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)


def test_lorad_fused_backward_matches_autograd_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for block in (None, (True, 2), (False, 2), (False, 4)):  # one block; row blocks; column blocks
        assert torch.autograd.gradcheck(lambda *t: lorad_linear(*t, block=block), (x, w, b, A, B))


def test_lorad_gradients_equal_plain_autograd_fp32() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9, 40)
    w, b = torch.randn(24, 40), torch.randn(24)
    A, B = torch.randn(24, 6, requires_grad=True), torch.randn(6, 20, requires_grad=True)
    torch.nn.functional.linear(x, rotate_pairs(w, A @ B), b).square().sum().backward()
    want_a, want_b = A.grad.clone(), B.grad.clone()
    for block in (None, (True, 5), (False, 6)):
        A.grad = B.grad = None
        lorad_linear(x, w, b, A, B, block=block).square().sum().backward()
        torch.testing.assert_close(A.grad, want_a, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(B.grad, want_b, rtol=1e-4, atol=1e-3)


def test_lorad_under_bf16_autocast_on_cpu() -> None:
    model, layer = _random_lorad_layer()
    set_adapter(model, "a")
    x = torch.randn(8, 40)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
    torch.testing.assert_close(y.float(), want.detach(), rtol=0.05, atol=0.05)
    ad = layer.adapters["a"]
    assert ad.A.grad.dtype == torch.float32 and torch.isfinite(ad.A.grad).all() and ad.A.grad.abs().sum() > 0
    assert layer.weight.grad is None


# --- errors ----------------------------------------------------------------------------------------


def test_clear_errors() -> None:
    odd = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="even input width"):
        add_adapter(odd, "lorad", "a", 2, ["0"])
    m = _stack()
    with pytest.raises(ValueError, match="unknown target preset"):
        add_adapter(m, "lorad", "a", 2, "unet_teacher")
    with pytest.raises(ValueError, match="rank"):
        add_adapter(m, "lora", "a", 0, "re:0")
    with pytest.raises(ValueError, match="unknown adapter kind"):
        add_adapter(m, "ia3", "a", 2, "re:0")
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        add_adapter(m, "lora", "a", 2, "unet_student")
    with pytest.raises(ValueError, match="not nn.Linear"):
        add_adapter(m, "lora", "a", 2, ["1"])
    add_adapter(m, "lora", "a", 2, "re:0")
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapter(m, "lorad", "a", 2, "re:2")
    with pytest.raises(KeyError, match="no adapter named"):
        set_adapter(m, "b")
    state = adapter_state_dict(m, "a")
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(m, "a", {k + "x": v for k, v in state.items()})
    with pytest.raises(ValueError, match="wrong shapes"):
        load_adapter_state_dict(m, "a", {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in state.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_under_bf16_autocast_on_cpu(kind: str) -> None:
    _, model, (x,) = _setup(CASES[0], kind)
    _perturb(model, "a")
    set_adapter(model, "a")
    want = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    for p in adapter_parameters(model, "a"):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()


def test_dora_matches_its_formula_with_detached_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    add_adapter(model, "dora", "a", 3, ["0"], alpha=6.0)
    _perturb(model, "a")
    set_adapter(model, "a")
    layer, ad = model[0], model[0].adapters["a"]
    x = torch.randn(4, 10)
    model(x).sum().backward()
    got = [p.grad.clone() for p in (ad.m, ad.A, ad.B)]
    for p in (ad.m, ad.A, ad.B):
        p.grad = None
    v = layer.weight + 2.0 * ad.B @ ad.A  # alpha / r = 2
    w = ad.m.unsqueeze(1) * v / v.norm(dim=1, keepdim=True).detach()
    torch.nn.functional.linear(x, w, layer.bias).sum().backward()
    for g, p in zip(got, (ad.m, ad.A, ad.B)):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("kind, rank, ok", [
    ("lorad", 4, True), ("lorad", 0, False), ("lora", -1, False), ("dora", 2, True),
    ("full", 0, True), ("full", 4, False),
])
def test_one_rank_rule_for_spec_layers_and_config(kind: str, rank: int, ok: bool) -> None:
    """AdapterSpec, add_adapter and the job config accept and reject the same (kind, rank) pairs:
    whatever passes the config builds in the worker."""
    from wadi_core.adapters import AdapterSpec, apply_adapter
    from wadi_core.config import ConfigError

    from pipelines.config.job import load_config

    def spec() -> AdapterSpec:
        return AdapterSpec(kind, rank, "re:0")

    def layers() -> None:
        add_adapter(_stack(), kind, "a", rank, "re:0")

    def config() -> None:
        load_config("embedded", {"vsd.student.kind": kind, "vsd.student.rank": rank})

    for attempt, error in ((spec, ValueError), (layers, ValueError), (config, ConfigError)):
        if ok:
            attempt()
        else:
            with pytest.raises(error, match="rank"):
                attempt()
    if ok:
        apply_adapter(_stack(), spec(), "student", "sd")
