"""Losses against values computed by hand on tiny tensors (numbers written out below)."""

import math

import pytest
import torch

from fmri2text.config import LossConfig
from fmri2text.errors import UserError
from fmri2text.losses import (
    AlignmentLoss,
    AnswerCrossEntropy,
    ClipLoss,
    CosineClassifier,
    DanceLoss,
    EntropySeparation,
    L2L1Loss,
    MemoryBank,
    NeighborhoodClustering,
    StageTwoLoss,
    alignment_loss_from_config,
    entropy_from_logits,
    stage_two_loss_from_config,
)

E = math.e

# ----------------------------------------------------------------------------- CLIP

# z1=(1,0), z2=(0,1); x1=(1,0), x2=(1,1) → cosines S = [[1, 1/√2], [0, 1/√2]]
Z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
X2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def test_clip_hand_value_at_tau_half():
    # logits = S / 0.5 = [[2, √2], [0, √2]]
    row1 = math.log(1 + math.exp(math.sqrt(2) - 2))  # 0.442548: -log softmax([2, √2])[0]
    row2 = math.log(1 + math.exp(-math.sqrt(2)))  # 0.217622: -log softmax([0, √2])[1]
    col1 = math.log(1 + math.exp(-2))  # 0.126928: column 1 = [2, 0], positive first
    col2 = math.log(2)  # 0.693147: column 2 = [√2, √2]
    expected = 0.5 * ((row1 + row2) / 2 + (col1 + col2) / 2)  # 0.370061
    assert expected == pytest.approx(0.370061, abs=1e-6)
    got = ClipLoss(tau=0.5)(Z2, X2)["clip"]
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # one direction alone would be 0.330085 (rows) or 0.410038 (columns): both are used
    assert abs(got.item() - (row1 + row2) / 2) > 0.03


def test_clip_symmetric_pooled_and_temperature_matters():
    loss = ClipLoss(tau=0.5)
    a = loss(Z2, X2)["clip"]
    assert loss(X2, Z2)["clip"].item() == pytest.approx(a.item(), abs=1e-6)
    # (B, L, D) tokens are mean-pooled: token means equal Z2 and X2 (up to scale)
    z_tok = torch.stack([torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])])
    x_tok = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 2.0]])])
    assert loss(z_tok, x_tok)["clip"].item() == pytest.approx(a.item(), abs=1e-6)
    # τ = 0.05 (paper default): logits = S·20 → rows 1 and 2 are near-certain
    at_paper_tau = ClipLoss()(Z2, X2)["clip"].item()
    row1 = math.log(1 + math.exp(20 * (1 / math.sqrt(2) - 1)))
    row2 = math.log(1 + math.exp(-20 / math.sqrt(2)))
    col1 = math.log(1 + math.exp(-20))
    col2 = math.log(2)
    assert at_paper_tau == pytest.approx(0.25 * (row1 + row2 + col1 + col2), abs=1e-6)


def test_clip_learnable_temperature_is_log_scale_parameter():
    loss = ClipLoss(tau=0.05, learnable=True)
    assert loss.tau == pytest.approx(0.05)
    assert loss.logit_scale.requires_grad
    assert loss.logit_scale.item() == pytest.approx(math.log(20.0))
    loss(Z2, X2)["clip"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    assert "logit_scale" not in dict(ClipLoss(learnable=False).named_parameters())


# ----------------------------------------------------------------------------- L2L1

# one sample, two tokens: diffs (1, 2) → ‖·‖²=5, ‖·‖₁=3 and (−1, 1) → ‖·‖²=2, ‖·‖₁=2
ZT = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
XT = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])


@pytest.mark.parametrize("alpha, expected", [(0.0, 3.5), (1.0, 2.5), (0.3, 0.7 * 3.5 + 0.3 * 2.5)])
def test_l2l1_hand_values(alpha, expected):
    terms = L2L1Loss(alpha)(ZT, XT)
    assert terms["l2"].item() == pytest.approx(3.5)  # (5 + 2) / 2 tokens
    assert terms["l1"].item() == pytest.approx(2.5)  # (3 + 2) / 2 tokens
    assert terms["l2l1"].item() == pytest.approx(expected)  # α=0.3 → 3.2


def test_l2l1_means_over_samples_and_tokens():
    z = torch.cat([ZT, torch.zeros(1, 2, 2)])  # second sample has zero error
    x = torch.cat([XT, torch.zeros(1, 2, 2)])
    assert L2L1Loss(0.0)(z, x)["l2"].item() == pytest.approx(3.5 / 2)


def test_alignment_total_is_convex_combination():
    z = torch.stack([ZT[0], torch.tensor([[0.0, 1.0], [0.5, 0.5]])])  # (2, 2, 2)
    x = torch.stack([XT[0], torch.tensor([[1.0, 1.0], [0.0, 0.0]])])
    terms = AlignmentLoss(beta=0.25, alpha=0.3, tau=0.5)(z, x)
    assert set(terms) == {"clip", "l2", "l1", "l2l1", "total"}
    clip = ClipLoss(0.5)(z, x)["clip"]
    l2l1 = L2L1Loss(0.3)(z, x)["l2l1"]
    assert terms["total"].item() == pytest.approx(0.25 * clip.item() + 0.75 * l2l1.item(), rel=1e-6)


# ----------------------------------------------------------------------------- answer CE


def test_answer_ce_ignores_prefix_and_shifts():
    labels = torch.tensor([[-100, -100, 2, 0]])
    logits = torch.tensor([[[50.0, 0.0, 0.0],  # pos 0 predicts labels[1] = -100: ignored
                            [0.0, 0.0, math.log(3.0)],  # pos 1 predicts 2: p = 3/5
                            [0.0, 0.0, 0.0],  # pos 2 predicts 0: p = 1/3
                            [-50.0, 90.0, 0.0]]])  # pos 3 predicts nothing: ignored
    expected = (-math.log(3 / 5) + math.log(3)) / 2  # (0.510826 + 1.098612) / 2 = 0.804719
    got = AnswerCrossEntropy()(logits, labels)["ce"].item()
    assert got == pytest.approx(expected, abs=1e-6)
    # without the shift, pos 2 would be scored on label 2 and pos 3 on label 0 (≈140): different
    unshifted = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100).item()
    assert abs(unshifted - expected) > 1.0


def test_answer_ce_mean_over_tokens_of_whole_batch_and_empty_batch():
    labels = torch.tensor([[-100, 1, 1], [-100, -100, 0]])  # 3 answer tokens in all
    logits = torch.zeros(2, 3, 4)  # uniform over V=4 → ln 4 per token
    assert AnswerCrossEntropy()(logits, labels)["ce"].item() == pytest.approx(math.log(4))
    empty = torch.full((1, 3), -100)
    z = torch.zeros(1, 3, 4, requires_grad=True)
    out = AnswerCrossEntropy()(z, empty)["ce"]
    assert out.item() == 0.0
    out.backward()  # has a graph, no NaN


# ----------------------------------------------------------------------------- DANCE: NC

# d=2, C=2 prototypes P, N=3 bank rows M, batch B=2 with bank indices [0, 2]
P = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
M = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
F_T = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
IDX = torch.tensor([0, 2])


def _h(logits):  # entropy of softmax of a python list
    z = sum(math.exp(v) for v in logits)
    return math.log(z) - sum(v * math.exp(v) for v in logits) / z


def test_nc_masks_batch_bank_columns_and_diagonal_by_hand():
    # τ = 1. Row 1, f=(1,0): protos [1, 0]; bank [1, 0, −1] minus cols 0, 2 → [0];
    # batch [diag, 0] → [0].  Valid logits [1, 0, 0, 0]: H1 = ln(e+3) − e/(e+3) = 1.268301
    # Row 2, f=(0,1): protos [0, 1]; bank [0, 1, 0] → [1]; batch [0, diag] → [0].
    # Valid logits [0, 1, 1, 0]: H2 = ln(2+2e) − 2e/(2+2e) = 1.275350
    h1 = math.log(E + 3) - E / (E + 3)
    h2 = math.log(2 + 2 * E) - 2 * E / (2 + 2 * E)
    assert (h1 + h2) / 2 == pytest.approx(1.271826, abs=1e-6)
    got = NeighborhoodClustering(tau=1.0)(F_T, IDX, P, M).item()
    assert got == pytest.approx((h1 + h2) / 2, abs=1e-5)
    # Unmasked (all 7 columns) the value would be much larger:
    # row 1 [1,0, 1,0,−1, 1,0] → 1.768529; row 2 [0,1, 0,1,0, 0,1] → ln(4+3e) − 3e/(4+3e)
    unmasked = (_h([1, 0, 1, 0, -1, 1, 0]) + _h([0, 1, 0, 1, 0, 0, 1])) / 2
    assert _h([1, 0, 1, 0, -1, 1, 0]) == pytest.approx(1.768529, abs=1e-6)
    assert abs(got - unmasked) > 0.4
    # masking only the own column (not the other batch sample's) would also differ
    own_only = (_h([1, 0, 0, -1, 0]) + _h([0, 1, 0, 1, 0])) / 2
    assert abs(got - own_only) > 0.1


def test_nc_min_similarity_mode_is_dance_code_fill():
    # masked logits = −1/τ = −1 (cosine −1) instead of being dropped
    row1 = [1, 0, -1, 0, -1, -1, 0]
    row2 = [0, 1, -1, 1, -1, 0, -1]
    expected = (_h(row1) + _h(row2)) / 2
    got = NeighborhoodClustering(tau=1.0, mask="min_similarity")(F_T, IDX, P, M).item()
    assert got == pytest.approx(expected, abs=1e-5)


def test_nc_temperature_and_finite_gradients():
    # τ = 0.5 doubles every logit: row 1 valid [2, 0, 0, 0], row 2 [0, 2, 2, 0]
    expected = (_h([2, 0, 0, 0]) + _h([0, 2, 2, 0])) / 2
    f = F_T.clone().requires_grad_(True)
    protos = P.clone().requires_grad_(True)
    loss = NeighborhoodClustering(tau=0.5)(f, IDX, protos, M)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(protos.grad).all()
    assert protos.grad.abs().sum() > 0  # prototypes (g's weights) receive gradient


def test_entropy_of_excluded_columns_is_zero_contribution():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- DANCE: ES


def test_es_clamp_by_hand():
    # C = 4 → ρ = ln 4 / 2 = 0.693147, m = 0.5
    # uniform: H = ln 4 = 1.386294, |H−ρ| = 0.693147 > m → 0.693147
    # one-hot: H ≈ 0, |H−ρ| = 0.693147 → 0.693147
    # two-way: H = ln 2 = ρ, |H−ρ| = 0 → clamped to m = 0.5 (paper eq. 5 would give 0)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [100.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, -100.0, -100.0]], requires_grad=True)
    es = EntropySeparation(n_classes=4, margin=0.5)
    assert es.rho == pytest.approx(0.693147, abs=1e-6)
    loss = es(logits)
    expected = -(2 * math.log(2) + 0.5) / 3  # −0.628765
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    paper_form = -(2 * math.log(2) + 0.0) / 3  # −0.462098: differs by the constant m/3
    assert abs(loss.item() - paper_form) == pytest.approx(0.5 / 3, abs=1e-5)
    loss.backward()
    assert logits.grad[2].abs().max() == 0  # clamped sample: no gradient
    # a sample just above ρ+m is pushed up: uniform-ish has zero grad by symmetry, so test a skewed one
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)  # H ≈ 1.28 > ρ + m
    es(x).backward()
    assert x.grad[0, 0] > 0  # descending raises the entropy (flattens the peak)


# ----------------------------------------------------------------------------- DANCE: parts


def test_cosine_classifier_and_renormalize():
    g = CosineClassifier(dim=2, n_classes=2, temperature=0.5)
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    out = g(torch.tensor([[3.0, 4.0]]))  # cos = [0.6, 0.8] → / 0.5
    assert out[0].tolist() == pytest.approx([1.2, 1.6])
    g.renormalize_()
    assert g.weight.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert g(torch.tensor([[3.0, 4.0]]))[0].tolist() == pytest.approx([1.2, 1.6])


def test_memory_bank_first_write_replaces_then_momentum():
    bank = MemoryBank(n_target=3, dim=2, momentum=0.5)
    assert bank.features.norm(dim=1).tolist() == pytest.approx([1.0] * 3)  # random unit rows
    bank.update(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))
    assert bank.features[1].tolist() == pytest.approx([1.0, 0.0])  # replaced, normalised
    bank.update(torch.tensor([[0.0, 5.0]]), torch.tensor([1]))
    r = 1 / math.sqrt(2)  # normalize(0.5·(1,0) + 0.5·(0,1))
    assert bank.features[1].tolist() == pytest.approx([r, r])
    bank.fill(torch.tensor([[0.0, -2.0]]), torch.tensor([0]))
    assert bank.features[0].tolist() == pytest.approx([0.0, -1.0])
    assert bank.filled.tolist() == [True, True, False]


def test_dance_loss_combines_terms():
    torch.manual_seed(0)
    dance = DanceLoss(dim=2, n_classes=2, n_target=3, tau=1.0, classifier_temperature=0.5,
                      eta=0.1, margin=0.5)
    with torch.no_grad():
        dance.classifier.weight.copy_(P)
    dance.memory.fill(M, torch.arange(3))
    src = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    src_y = torch.tensor([0, 0])
    terms = dance(src, src_y, F_T, IDX)
    # source CE with logits cos/0.5: sample 1 [2, 0] → ln(1+e^−2); sample 2 [0, 2] → ln(1+e^2)
    ce = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert terms["source_ce"].item() == pytest.approx(ce, abs=1e-5)
    assert terms["nc"].item() == pytest.approx(1.271826, abs=1e-5)  # as in the hand NC test
    es = EntropySeparation(2, 0.5)(dance.classifier(F_T)).item()
    assert terms["es"].item() == pytest.approx(es, abs=1e-6)
    assert terms["da"].item() == pytest.approx(ce + 0.1 * (1.271826 + es), abs=1e-5)


def test_stage_two_total_with_and_without_da():
    torch.manual_seed(0)
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 1, 2]])
    dance = DanceLoss(dim=2, n_classes=2, n_target=3)
    loss = StageTwoLoss(lambda_=0.25, dance=dance)
    terms = loss(logits, labels, F_T, torch.tensor([0, 1]), F_T, IDX)
    assert terms["ce"].item() == pytest.approx(math.log(4))
    assert terms["total"].item() == pytest.approx(0.25 * math.log(4) + 0.75 * terms["da"].item(), rel=1e-6)
    no_da = StageTwoLoss(lambda_=0.25)(logits, labels)
    assert set(no_da) == {"ce", "total"}
    assert no_da["total"].item() == pytest.approx(0.25 * math.log(4))
    with pytest.raises(ValueError, match="target_features"):
        loss(logits, labels)


def test_from_config_and_bad_values():
    cfg = LossConfig(beta=0.2, alpha=0.7, tau_clip=0.1)
    a = alignment_loss_from_config(cfg)
    assert a.beta == 0.2 and a.l2l1.alpha == 0.7 and a.clip.tau == pytest.approx(0.1)
    s = stage_two_loss_from_config(LossConfig(), dim=8, n_classes=5, n_target=11)
    assert s.dance.nc.tau == 0.5 and s.dance.memory.features.shape == (11, 8)
    assert stage_two_loss_from_config(LossConfig(domain_adaptation=False), dim=8, n_classes=5,
                                      n_target=11).dance is None
    with pytest.raises(UserError, match=r"loss\.beta=1\.5"):
        alignment_loss_from_config(LossConfig(beta=1.5))
    with pytest.raises(UserError, match="exclude, min_similarity"):
        stage_two_loss_from_config(LossConfig(nc_mask="none"), dim=2, n_classes=2, n_target=2)
