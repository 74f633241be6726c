"""Losses against values computed by hand on a 3-token vocabulary."""

import math

import pytest
import torch

from mend.core.losses import ce_loss, kl_distill
from mend.errors import ConfigError

P_T = [0.5, 0.25, 0.25]
TEACHER = torch.tensor([[[math.log(p) for p in P_T]]])  # (1, 1, 3)
UNIFORM = torch.zeros(1, 1, 3)                            # student: 1/3 each


def test_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 11)
    assert kl_distill(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_hand_computation_and_direction():
    # KL(T || S) = sum_v p_T log(p_T / p_S) = 0.5 ln(1.5) + 2 * 0.25 ln(0.75)
    expected = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    assert kl_distill(UNIFORM, TEACHER).item() == pytest.approx(expected, rel=1e-5)
    # The reverse direction, KL(S || T) = sum_v (1/3) ln((1/3) / p_T), is a different number.
    reverse = sum(1 / 3 * math.log((1 / 3) / p) for p in P_T)
    assert kl_distill(TEACHER, UNIFORM).item() == pytest.approx(reverse, rel=1e-5)
    assert abs(reverse - expected) > 1e-3


def test_kl_temperature_softens_and_rescales_by_tau_squared():
    tau = 2.0
    soft = [math.sqrt(p) for p in P_T]  # p ** (1 / tau), then renormalised
    q = [s / sum(soft) for s in soft]
    expected = tau ** 2 * sum(p * math.log(p * 3) for p in q)
    assert kl_distill(UNIFORM, TEACHER, temperature=tau).item() == pytest.approx(expected, 1e-5)


def test_kl_mask_and_token_mean():
    teacher = torch.cat([TEACHER, TEACHER, torch.randn(1, 1, 3)], dim=1)    # (1, 3, 3)
    student = torch.cat([UNIFORM, TEACHER, torch.randn(1, 1, 3)], dim=1)
    one = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    # Position 2 is masked out; positions 0 (KL = one) and 1 (KL = 0) are averaged.
    mask = torch.tensor([[1, 1, 0]])
    assert kl_distill(student, teacher, mask).item() == pytest.approx(one / 2, rel=1e-5)
    assert kl_distill(student, teacher, torch.zeros(1, 3)).item() == 0.0


def test_kl_gradient_reaches_only_the_student():
    student = torch.zeros(1, 1, 3, requires_grad=True)
    teacher = TEACHER.clone().requires_grad_(True)
    kl_distill(student, teacher).backward()
    # d KL / d student_logits = p_S - p_T
    assert torch.allclose(student.grad[0, 0], torch.tensor([1 / 3 - 0.5, 1 / 3 - 0.25,
                                                            1 / 3 - 0.25]), atol=1e-6)
    assert teacher.grad is None


def test_ce_matches_hand_computation():
    logits = torch.cat([UNIFORM, TEACHER, TEACHER], dim=1)  # (1, 3, 3)
    targets = torch.tensor([[2, 0, 1]])
    # -ln(1/3) at position 0, -ln(0.5) at position 1; position 2 masked out.
    mask = torch.tensor([[1, 1, 0]])
    assert ce_loss(logits, targets, mask).item() == pytest.approx(
        (math.log(3) + math.log(2)) / 2, rel=1e-6)
    everything = (math.log(3) + math.log(2) + math.log(4)) / 3
    assert ce_loss(logits, targets).item() == pytest.approx(everything, rel=1e-6)



def test_auto_chunk_fills_an_eighth_of_the_free_gpu_memory(monkeypatch):
    from mend.config import from_dict
    from mend.core.losses import CPU_CHUNK, auto_chunk
    from mend.methods.mend import ObjectiveConfig

    assert auto_chunk("cpu", 49152) == CPU_CHUNK == 1024
    # 120 GiB free, a 49152-word vocabulary: 15 GiB / (6 x 4 bytes x 49152) = 13653 positions.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (120 * 2**30, 141 * 2**30))
    assert auto_chunk("cuda", 49152) == 15 * 2**30 // (24 * 49152) == 13653
    # A full GPU still gets the CPU's chunk, not fewer positions.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**20, 141 * 2**30))
    assert auto_chunk("cuda:0", 262144) == 1024
    assert from_dict(ObjectiveConfig, {"logits_chunk": "auto"}).logits_chunk == "auto"
    assert ObjectiveConfig().logits_chunk == "auto"
    with pytest.raises(ConfigError, match="auto or null"):
        ObjectiveConfig(logits_chunk=0)
