import torch
import torch.nn.functional as F

from trainers.distill import distillation_loss


def test_distillation_loss_matches_its_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    T, a = 3.0, 0.6
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, T, a), expected, atol=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    s, t, y = torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 1, 1])
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.0), F.cross_entropy(s, y))
