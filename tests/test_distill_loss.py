import torch
import torch.nn.functional as F

from trainers.distill import distillation_loss, topk_distillation_loss


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


def test_topk_loss_with_every_token_kept_is_the_full_loss():
    torch.manual_seed(0)
    s, t, y = torch.randn(12, 50), torch.randn(12, 50), torch.randint(0, 50, (12,))
    values, indices = t.topk(50, dim=-1)
    assert torch.allclose(topk_distillation_loss(s, values, indices, y, 2.0, 0.6), distillation_loss(s, t, y, 2.0, 0.6), atol=1e-5)
    # With fewer kept, the teacher's mass is renormalized over its top k: still finite, still positive.
    values, indices = t.topk(5, dim=-1)
    assert 0 < topk_distillation_loss(s, values, indices, y, 2.0, 1.0) < float("inf")


def test_precomputing_a_language_models_outputs_keeps_its_top_k_per_token(tmp_path):
    """The Ray Data actor's work on one batch of token blocks (the actor pool is run for real on a
    classifier in test_distill_teacher_outputs)."""
    from trainers.modeldir import model_spec, save_model_dir
    from trainers.distill import TOPK_INDICES, TOPK_VALUES, TeacherOutputs
    from trainers.models import build_model

    meta = {"input_shape": [16], "num_classes": 256, "classes": None, "task": "lm", "augment": [], "seed": 0}
    model_cfg = {"type": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16, "dropout": 0.0}
    torch.manual_seed(0)
    model = build_model(model_cfg, [16], 256).eval()
    save_model_dir(tmp_path, model.state_dict(), model_spec(model_cfg, meta))
    tokens = torch.randint(0, 256, (4, 17), dtype=torch.int32)
    out = TeacherOutputs(str(tmp_path), meta, top_k=8)({"tokens": tokens.numpy(), "key": torch.arange(4).numpy()})
    assert out[TOPK_VALUES].shape == (4, 16, 8) and out[TOPK_INDICES].shape == (4, 16, 8)
    with torch.inference_mode():
        expected = model(tokens[:, :-1].long()).topk(8, dim=-1)
    assert torch.allclose(torch.from_numpy(out[TOPK_VALUES]), expected.values, atol=1e-5)
    assert torch.equal(torch.from_numpy(out[TOPK_INDICES]).long(), expected.indices)
    assert (out["split"] == 0).all()


def test_topk_soft_targets_leave_the_students_mass_outside_the_k_to_the_cross_entropy():
    """Only how the student ranks the teacher's k tokens is the soft targets' business: raising
    every other logit (the right token is often among them) leaves the soft term as it was."""
    torch.manual_seed(0)
    s, t, y = torch.randn(12, 50), torch.randn(12, 50), torch.randint(0, 50, (12,))
    values, indices = t.topk(5, dim=-1)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, indices, False)
    raised = s + 3.0 * outside
    assert torch.allclose(topk_distillation_loss(raised, values, indices, y, 2.0, 1.0),
                          topk_distillation_loss(s, values, indices, y, 2.0, 1.0), atol=1e-6)
