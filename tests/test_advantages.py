import pytest
import torch

from rlclip.advantages import dr_grpo, grpo, rloo
from rlclip.errors import ConfigError


def test_grpo_group_normalisation_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo(r, 4, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    torch.testing.assert_close(a[4:], torch.zeros(4))  # all-equal group: zero advantage, no NaN


def test_dr_grpo_and_rloo():
    r = torch.tensor([3.0, 1.0, 2.0])
    torch.testing.assert_close(dr_grpo(r, 3), torch.tensor([1.0, -1.0, 0.0]))
    # leave-one-out: 3 - (1+2)/2 = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0
    torch.testing.assert_close(rloo(r, 3), torch.tensor([1.5, -1.5, 0.0]))
    torch.testing.assert_close(rloo(r, 3), dr_grpo(r, 3) * 3 / 2)


def test_bad_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo(torch.zeros(4), 3)
    with pytest.raises(ConfigError, match="group_size"):
        rloo(torch.zeros(4), 1)
