"""`backbone-weights`: DLTR starts from a file the user supplies, in every format named, or the run is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError
from tace.common.models import StudyModels
from tace.common.pretrained import initial_arrays
from tace.simulation.runner import run_reference

TINY = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=1 head-rounds=1 clinical-rounds=1 radiomics-rounds=1 patience=0"


def run_config(extra: str = "", **keys) -> RunConfig:
    return RunConfig.from_run_config({**parse_overrides(f"{TINY} {extra}"), **keys})


def donor(seed: int = 7, backbone: str = "small") -> StudyModels:
    return StudyModels.build(backbone, 3, 14, seed=seed)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_without_a_file_the_weights_are_the_seeded_initialisation():
    run = run_config()
    assert same(initial_arrays(run)["dltr"], initial_arrays(run)["dltr"])
    assert not same(initial_arrays(run)["dltr"], donor().arrays()["dltr"])


@pytest.mark.parametrize("layout", ["dltr", "backbone", "prefixed", "checkpoint", "npz"])
def test_dltr_starts_from_the_file_in_each_layout(tmp_path, layout):
    models = donor()
    dltr = models.dltr.state_dict()
    path = tmp_path / ("w.npz" if layout == "npz" else "w.pt")
    if layout == "dltr":
        torch.save(dltr, path)
    elif layout == "backbone":  # a bare backbone: DLTR's own output layer keeps the run's initialisation
        torch.save(models.dltr.backbone.state_dict(), path)
    elif layout == "prefixed":
        torch.save({f"module.dltr.{k}": v for k, v in dltr.items()}, path)
    elif layout == "checkpoint":
        torch.save({"epoch": 3, "state_dict": dltr}, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in dltr.items()})
    run = run_config(backbone_weights=str(path))
    arrays, seeded = initial_arrays(run), initial_arrays(run_config())
    want = models.arrays()["dltr"]
    for k, v in arrays["dltr"].items():
        expected = seeded["dltr"][k] if layout == "backbone" and k.startswith("head.") else want[k]
        assert np.array_equal(v, expected), k
    for stage in ("head", "clinical", "radiomics"):  # only DLTR is touched
        assert same(arrays[stage], seeded[stage])


def test_a_finished_runs_model_file_seeds_a_new_study(tiny_cohort, tmp_path):
    out = tmp_path / "first"
    run_reference("centralized", tiny_cohort, out, run_config())
    first = out / "models" / "tace-model.zip"
    from tace.common.artifact import read_model

    arrays = initial_arrays(run_config(backbone_weights=str(first)))
    assert same(arrays["dltr"], read_model(first).arrays["dltr"])
    # ... and the run with it trains (the path relative to where tace-sim runs is made absolute first).
    run = run_config(backbone_weights="first/models/tace-model.zip").resolved(tmp_path)
    summary = run_reference("centralized", tiny_cohort, tmp_path / "second", run)
    assert summary["models"]["dltr"]["pooled_holdout_auc"] is not None
    with pytest.raises(TaceError, match=r"holds a 'small' DLTR, the run's backbone is 'resnet10'"):
        initial_arrays(run_config(backbone="resnet10", backbone_weights=str(first)))


def test_weights_that_do_not_fit_are_refused_with_what_differs(tmp_path):
    other = tmp_path / "resnet10.pt"
    torch.save(donor(backbone="resnet10").dltr.state_dict(), other)
    with pytest.raises(TaceError, match=r"(?s)tensors the 'small' DLTR does not.*give a weights file of the 'small' backbone"):
        initial_arrays(run_config(backbone_weights=str(other)))
    dltr = donor().dltr.state_dict()
    key = next(k for k in dltr if k.endswith("weight") and dltr[k].ndim == 5)
    torch.save({**dltr, key: torch.zeros(2, 2, 1, 1, 1)}, tmp_path / "shape.pt")
    with pytest.raises(TaceError, match=rf"1 tensors of .* differ in shape .*{key} \(2, 2, 1, 1, 1\)"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "shape.pt")))
    torch.save({k: v for k, v in dltr.items() if k != key}, tmp_path / "part.pt")
    with pytest.raises(TaceError, match=rf"lacks 1 of the 'small' backbone's tensors: {key}"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "part.pt")))


def test_a_missing_damaged_or_unsafe_file_is_a_clear_error(tiny_cohort, tmp_path):
    with pytest.raises(TaceError, match="does not exist"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "none.pt")))
    (tmp_path / "w.txt").write_text("weights")
    with pytest.raises(TaceError, match="not a weights file TACE-FL reads"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "w.txt")))
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TaceError, match="torch cannot load"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "cut.pt")))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "object.pt")  # a whole pickled module: never unpickled
    with pytest.raises(TaceError, match="torch cannot load"):
        initial_arrays(run_config(backbone_weights=str(tmp_path / "object.pt")))
    # A run given a bad file stops before any training, with the same message.
    with pytest.raises(TaceError, match="does not exist"):
        run_reference("centralized", tiny_cohort, tmp_path / "run", run_config(backbone_weights=str(tmp_path / "none.pt")))
