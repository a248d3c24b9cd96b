import copy
import math

import pytest
import torch

from hvctl.train.config import FlowConfig
from hvctl.train.dpo import DpoObjective, dpo_loss


def _tiny_transformer(seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    from hvctl.models.presets import get_preset

    torch.manual_seed(seed)
    config = dict(get_preset("tiny").transformer, num_layers=1, num_single_layers=1)  # small: the loss is the point
    return HunyuanVideoTransformer3DModel(**config).float()


def _pair_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 16, 2, 4, 4)
    return {"latent_mean": torch.randn(shape, generator=g), "latent_std": torch.zeros(shape),
            "rejected.latent_mean": torch.randn(shape, generator=g), "rejected.latent_std": torch.zeros(shape),
            "text_states": torch.randn(2, 5, 64, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.long),
            "pooled": torch.randn(2, 32, generator=g)}


def test_the_loss_formula():
    err = torch.tensor([0.3, 0.7])
    loss, margin = dpo_loss(err, err, err, err, beta=100.0)  # model = reference: no margin
    assert torch.equal(margin, torch.zeros(2)) and torch.allclose(loss, torch.full((2,), math.log(2)))
    # The model improved on the chosen sample (0.5 -> 0.3) and not on the rejected: margin 0.2.
    loss, margin = dpo_loss(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5]), beta=10.0)
    assert torch.allclose(margin, torch.tensor([0.2])) and torch.allclose(loss, -torch.nn.functional.logsigmoid(torch.tensor([1.0])))


def test_at_the_reference_the_margin_is_nil_and_a_step_moves_the_model_toward_the_chosen_sample():
    model = _tiny_transformer()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    objective = DpoObjective(FlowConfig(timestep_sampling="uniform"), beta=500.0, reference=reference)
    batch = _pair_batch()
    loss, logs = objective(model, batch, torch.Generator().manual_seed(1))
    assert logs["margin"] == 0.0 and abs(loss.item() - math.log(2)) < 1e-6
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    _, after = objective(model, batch, torch.Generator().manual_seed(1))  # same noise and sigma
    assert after["margin"] > 0 and after["reward_accuracy"] == 1.0
    assert after["chosen_err"] < logs["chosen_err"]  # closer to the chosen sample's velocity
    assert after["rejected_err"] > logs["rejected_err"]  # further from the rejected one's


def test_lora_reference_is_the_model_with_its_adapters_off():
    from hvctl.lora import LoraSettings, add_lora

    model = _tiny_transformer()
    add_lora(model, LoraSettings(rank=2, alpha=2.0))
    objective = DpoObjective(FlowConfig(), beta=10.0, reference=None)
    batch = _pair_batch()
    loss, logs = objective(model, batch, torch.Generator().manual_seed(0))
    assert logs["margin"] == 0.0  # a fresh adapter adds nothing: model = reference
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_beta_must_be_positive():
    from hvctl.errors import HvctlError

    for beta in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(HvctlError, match="dpo.beta"):
            DpoObjective(FlowConfig(), beta=beta)
