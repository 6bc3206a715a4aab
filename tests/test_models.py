"""Models: shape tables per backbone, no BatchNorm, no in-place operations; clinical encoding; histogram AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from tace.common.clinical import FEATURES, ClinicalEncoder, ClinicalStats
from tace.common.config import RunConfig
from tace.common.errors import ConfigError
from tace.common.manifest import parse_manifest
from tace.common.metrics import auc_from_histograms, score_histograms
from tace.common.models import (
    BACKBONES,
    DLTR,
    ClinicalModel,
    FusionHead,
    LinearFusionHead,
    StudyModels,
    fusion_form,
    model_signature,
    start_fusion_head,
)


@pytest.mark.parametrize(
    ("backbone", "shape", "features"),
    [
        ("small", (2, 3, 32, 48, 48), 128),
        ("small", (3, 1, 8, 8, 8), 128),
        ("resnet10", (2, 3, 32, 48, 48), 256),
        ("resnet18", (2, 3, 16, 24, 24), 256),
        ("densenet121", (2, 3, 32, 32, 32), 1024),
        ("densenet121", (1, 2, 32, 48, 48), 1024),
    ],
)
def test_shape_table(backbone, shape, features):
    torch.manual_seed(0)
    model = DLTR(backbone, in_channels=shape[1]).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert model(x).shape == (shape[0],)
        assert model.features(x).shape == (shape[0], features)
    assert model.feature_dim == features
    head = FusionHead(features, len(FEATURES))
    assert head(torch.randn(shape[0], features), torch.randn(shape[0], len(FEATURES))).shape == (shape[0],)
    assert ClinicalModel(len(FEATURES))(torch.randn(5, len(FEATURES))).shape == (5,)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_batchnorm_and_nothing_in_place(backbone):
    model = DLTR(backbone)
    for name, module in model.named_modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm), f"BatchNorm at {name}"
        assert not getattr(module, "inplace", False), f"in-place op at {name}"
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # a backward pass through every layer works with autograd hooks that forbid in-place edits of views
    x = torch.randn(2, 3, 32, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


def test_unknown_backbone():
    with pytest.raises(ValueError, match="valid"):
        DLTR("vgg")


def test_study_models_round_trip():
    a = StudyModels.build("small", 3, len(FEATURES), seed=1)
    b = StudyModels.build("small", 3, len(FEATURES), seed=2)
    assert not np.array_equal(a.arrays()["dltr"]["head.weight"], b.arrays()["dltr"]["head.weight"])
    b.load(a.arrays())
    for stage in ("dltr", "head", "clinical"):
        for k, v in a.arrays()[stage].items():
            np.testing.assert_array_equal(v, b.arrays()[stage][k])


def test_linear_fusion_head_is_a_logistic_model_on_the_three_models_logits():
    """The linear head: the logits of DLTR, the clinical and the radiomics model (their output layers, copied in at
    the head stage's start and frozen), one weight each and an intercept; the models built after it start as with
    the MLP head."""
    mlp, linear = (StudyModels.build("small", 3, len(FEATURES), seed=4, fusion_head=f) for f in ("mlp", "linear"))
    assert isinstance(mlp.head, FusionHead) and isinstance(linear.head, LinearFusionHead)
    for stage in ("dltr", "clinical", "radiomics"):  # paired: only the head differs
        for k, v in mlp.arrays()[stage].items():
            np.testing.assert_array_equal(v, linear.arrays()[stage][k])
    assert fusion_form(linear.arrays()["head"]) == "linear" and fusion_form(mlp.arrays()["head"]) == "mlp"
    assert all(not v.any() for k, v in linear.arrays()["head"].items() if k != "logit_scale")  # zero: no random numbers drawn
    assert sum(p.numel() for p in linear.head.parameters() if p.requires_grad) == 4
    # at the head stage's start the linear head reads the trained models' output layers; the MLP head is left as it is
    started = start_fusion_head(linear.arrays())
    assert start_fusion_head(arrays := mlp.arrays()) is arrays["head"]
    linear.head.load_state_dict({k: torch.from_numpy(v) for k, v in started.items()})
    linear.head.score.weight.data.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    linear.head.score.bias.data.fill_(0.25)
    for m in (linear.dltr, linear.head):
        m.eval()
    n_radiomics = linear.head.radiomics_dim
    x, clinical, radiomics = torch.randn(4, 3, 16, 24, 24), torch.randn(4, len(FEATURES)), torch.randn(4, n_radiomics)
    with torch.no_grad():
        got = linear.head(linear.dltr.features(x), clinical, radiomics)
        want = 2.0 * linear.dltr(x) - linear.clinical(clinical) + 0.5 * linear.radiomics(radiomics) + 0.25
    torch.testing.assert_close(got, want)
    assert not any(p.requires_grad for name, p in linear.head.named_parameters() if not name.startswith("score."))
    # given each model's logit mean and spread, the head reads the logits centred and on unit scale
    scaled = start_fusion_head(linear.arrays(), {"clinical": [0.5, 2.0], "radiomics": [-1.0, 0.25], "dltr": []})
    linear.head.load_state_dict({k: torch.from_numpy(v) for k, v in scaled.items()})
    with torch.no_grad():
        got = linear.head(linear.dltr.features(x), clinical, radiomics)
        # no moments for DLTR: read as it is
        want = 2.0 * linear.dltr(x) - (linear.clinical(clinical) - 0.5) / 2.0 + 0.5 * (linear.radiomics(radiomics) + 1.0) / 0.25 + 0.25
    torch.testing.assert_close(got, want)
    for layer, stage in (("clinical_head", "clinical"), ("radiomics_head", "radiomics")):  # copies as they are
        np.testing.assert_array_equal(scaled[f"{layer}.weight"], linear.arrays()[stage]["linear.weight"])
    # the forms' signatures differ, so a site built for the other form is told before any weights move
    assert model_signature(("small",), 3, len(FEATURES), "linear") != model_signature(("small",), 3, len(FEATURES), "mlp")


def test_fusion_head_setting():
    assert RunConfig().head_form == "mlp" and RunConfig(dp=True).head_form == "linear"
    assert RunConfig(dp=True, fusion_head="mlp").head_form == "mlp" and RunConfig(fusion_head="linear").head_form == "linear"
    with pytest.raises(ConfigError, match="fusion-head must be"):
        RunConfig(fusion_head="deep")
    with pytest.raises(ValueError, match="unknown fusion head"):
        StudyModels.build("small", 3, len(FEATURES), fusion_head="deep")


def test_clinical_stats_merge_equals_pooled(tiny_cohort):
    records = [r for s in ("site-a", "site-b", "site-c") for r in parse_manifest(tiny_cohort / f"sites/{s}/manifest.csv").records]
    per_site = [
        ClinicalStats.from_records(parse_manifest(tiny_cohort / f"sites/{s}/manifest.csv").records) for s in ("site-a", "site-b", "site-c")
    ]
    merged = per_site[0].merge(per_site[1]).merge(per_site[2])
    pooled = ClinicalStats.from_records(records)
    assert merged.to_flat() == pytest.approx(pooled.to_flat())
    assert ClinicalStats.from_flat(merged.to_flat()).to_flat() == merged.to_flat()
    encoder = ClinicalEncoder.from_stats(merged)
    x = encoder.encode(records)
    assert x.shape == (len(records), len(FEATURES)) and np.isfinite(x).all()
    # Standardised with the pooled statistics: every column has mean 0 and SD 1 over the pooled patients
    # (or is constant, SD 0, when a category never occurs).
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    sd = x.std(axis=0)
    assert np.all((np.abs(sd - 1) < 1e-4) | (sd < 1e-6))
    assert ClinicalEncoder.from_dict(encoder.to_dict()) == encoder


def test_imputation_uses_pooled_mean_and_mode(tiny_cohort):
    from dataclasses import replace

    records = parse_manifest(tiny_cohort / "sites/site-a/manifest.csv").records
    encoder = ClinicalEncoder.from_stats(ClinicalStats.from_records(records))
    blank = replace(records[0], clinical={**records[0].clinical, "afp_ng_ml": None, "tace_type": None})
    row = encoder.encode([blank])[0]
    assert row[FEATURES.index("afp_ng_ml")] == pytest.approx(0.0, abs=1e-6)  # the mean, standardised
    mode = encoder.impute_categorical["tace_type"]
    expected = (1.0 if mode == "deb" else 0.0) - encoder.mean[FEATURES.index("tace_type=deb")]
    assert row[FEATURES.index("tace_type=deb")] == pytest.approx(expected / encoder.std[FEATURES.index("tace_type=deb")], abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_exact_auc_and_pools(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(3000) < 0.5
    s = 1 / (1 + np.exp(-(rng.normal(size=3000) + 1.2 * y)))
    neg, pos = score_histograms(y, s)
    assert abs(auc_from_histograms(neg, pos) - roc_auc_score(y, s)) <= 0.001
    halves = [score_histograms(y[i::2], s[i::2]) for i in (0, 1)]
    pooled = auc_from_histograms(np.add(halves[0][0], halves[1][0]), np.add(halves[0][1], halves[1][1]))
    assert pooled == pytest.approx(auc_from_histograms(neg, pos), abs=1e-12)
    assert auc_from_histograms(neg, [0] * len(pos)) is None


@pytest.mark.parametrize(("centre", "spread"), [(0.0, 1.5), (-0.8, 0.3), (1.0, 0.05)])
def test_logit_moments_from_histograms(centre, spread):
    """The mean and spread of the logit, from the histograms a site sends: close to the scores' own, also after
    merging cells of fewer than 5 patients (the default minimum cell count)."""
    from tace.common.metrics import logit_moments, merge_small_cells

    rng = np.random.default_rng(7)
    z = centre + spread * rng.normal(size=60)
    y = rng.random(60) < 0.4
    neg, pos = score_histograms(y, 1 / (1 + np.exp(-z)), bins=1000)
    mean, sd = logit_moments(neg, pos)
    assert mean == pytest.approx(z.mean(), abs=0.01 + 0.02 * spread) and sd == pytest.approx(z.std(ddof=1), rel=0.1, abs=0.01)
    mean, sd = logit_moments(*merge_small_cells(neg, pos, 5))
    assert mean == pytest.approx(z.mean(), abs=0.05 + 0.2 * spread) and sd == pytest.approx(z.std(ddof=1), rel=0.25, abs=0.02)
    assert logit_moments([0] * 10, [1] + [0] * 9) is None


def test_merge_small_cells_keeps_counts_and_bounds_cells():
    from tace.common.metrics import merge_small_cells

    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.5
    s = rng.random(60)
    neg, pos = score_histograms(y, s, bins=1000)
    for k in (0, 1, 3, 7):
        mneg, mpos = merge_small_cells(neg, pos, k)
        assert sum(mneg) == sum(neg) and sum(mpos) == sum(pos) and len(mneg) == 1000
        cells = [a + b for a, b in zip(mneg, mpos, strict=True) if a + b]
        assert min(cells) >= max(k, 1)
        if k <= 1:
            assert (mneg, mpos) == (neg, pos)
        # merging makes ties: the AUC moves, boundedly
        assert abs(auc_from_histograms(mneg, mpos) - roc_auc_score(y, s)) < 0.05 * max(k, 1)
