"""The reference layouts, run in this process without Flower: centralised (pooled) and local-only training.

`InProcessFederation` implements the coordinator workflow's `Federation` with direct calls to `SiteTask`s.
Each *training group* trains as one unit: centralised training is one group holding every training site (their
data pooled through the same model and training code), local training is one group holding one site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import ConcatDataset

from tace.client.task import SiteTask, with_role
from tace.common.clinical import FEATURES
from tace.common.config import RunConfig
from tace.common.encoders import Encoders, SiteStatistics
from tace.common.errors import TaceError
from tace.common.models import StudyModels, state_dict_numpy
from tace.common.protocol import Arrays
from tace.common.training import TrainResult, train_image_model, train_tabular_model
from tace.server.messages import Evaluation, Finetune, SiteInfo, SiteUpdate, TrainRound


def train_pooled(tasks: list[SiteTask], stage: str, models: StudyModels, encoder: Encoders | None, lr: float, seed: int) -> TrainResult:
    """One training call of `stage` on the training splits of several sites pooled together."""
    if len(tasks) == 1:
        return tasks[0].train(stage, models, encoder, lr, seed)
    settings = tasks[0].settings(stage, lr, seed)
    labels = torch.tensor([float(r.response) for t in tasks for r in t.train_records], dtype=torch.float32)  # type: ignore[arg-type]
    if stage == "dltr":
        data: ConcatDataset[Any] = ConcatDataset([t.dataset(t.train_records, augment=t.run.augment, seed=seed) for t in tasks])
        return train_image_model(models.dltr, data, settings)
    assert encoder is not None
    per_site = [t.tabular_inputs(stage, models, encoder, t.train_records) for t in tasks]
    inputs = [torch.cat([site[i] for site in per_site]) for i in range(len(per_site[0]))]
    return train_tabular_model(models.module(stage), inputs, labels, settings)


def check_holdout(holdout: tuple[str, ...], sites: list[str]) -> None:
    unknown = [s for s in holdout if s not in sites]
    if unknown:
        raise TaceError(f"holdout-sites names unknown site(s) {', '.join(unknown)}", f"sites: {', '.join(sorted(sites))}")


class InProcessFederation:
    """Sites reached by direct calls: training sites pooled into one unit (`pooled`) or each alone; all evaluate."""

    def __init__(self, tasks: list[SiteTask], run: RunConfig, pooled: bool, group_name: str | None = None) -> None:
        self.tasks = {t.site.site_id: t for t in tasks}
        self.run = run
        self.pooled = pooled
        self.group_name = group_name

    @property
    def groups(self) -> list[list[str]]:
        train = [s for s, t in sorted(self.tasks.items()) if t.role == "train"]
        return [train] if self.pooled else [[s] for s in train]

    def set_roles(self, holdout: tuple[str, ...]) -> None:
        check_holdout(holdout, list(self.tasks))
        self.tasks = {s: with_role(t, "holdout" if s in holdout else "train") for s, t in self.tasks.items()}

    def sites(self) -> list[SiteInfo]:
        return [
            SiteInfo(
                s,
                t.role,
                len(t.train_records),
                len(t.eval_records),
                sum(r.response == 1 for r in t.eval_records) if t.role == "train" else 0,
            )
            for s, t in sorted(self.tasks.items())
        ]

    def statistics(self) -> list[SiteStatistics]:
        return [SiteStatistics(self.tasks[s].clinical_stats(), self.tasks[s].radiomics_stats()) for g in self.groups for s in g]

    def _models(self, arrays: dict[str, Arrays], backbone: str) -> StudyModels:
        models = StudyModels.build(backbone, len(self.run.preprocess.sequences), len(FEATURES), fusion_head=self.run.head_form)
        models.load(arrays)
        return models

    def train(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: TrainRound) -> list[SiteUpdate]:
        q = request
        evaluation = self.evaluate(arrays, encoder, Evaluation(q.validate, q.backbone)) if q.validate else None
        replies = []
        for i, group in enumerate(self.groups):
            models = self._models(arrays, q.backbone)
            result = train_pooled([self.tasks[s] for s in group], q.stage, models, encoder, q.lr, q.seed + i)
            name = self.group_name or "+".join(group)
            metrics = {"train-loss": result.loss, "samples-per-s": result.samples_per_second, "local-s": result.seconds}
            replies.append(SiteUpdate(name, state_dict_numpy(models.module(q.stage)), result.num_examples, metrics, evaluation=evaluation))
            evaluation = None  # every site's validation rides on the first reply
        return replies

    def aggregate(self, stage: str, server_round: int, replies: list[SiteUpdate], current: Arrays) -> Arrays:
        """Sample-weighted mean (FedAvg); with one group this is that group's weights."""
        total = sum(r.num_examples for r in replies)
        return {k: sum(r.arrays[k] * (r.num_examples / total) for r in replies).astype(current[k].dtype) for k in current}  # type: ignore[union-attr]

    def strategy_state(self, stage: str) -> Arrays:
        return {}  # the sample-weighted mean keeps no state between rounds

    def restore_strategy(self, stage: str, state: Arrays) -> None:
        pass

    def evaluate(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: Evaluation) -> dict[str, dict[str, Any]]:
        q = request
        study_models = self._models(arrays, q.backbone)
        out = {}
        for site, task in sorted(self.tasks.items()):
            if (not q.final and task.role != "train") or (q.role is not None and task.role != q.role):
                continue  # holdout sites are evaluated once, at the end
            res = task.evaluate(study_models, encoder, q.models, write_predictions=q.final, tag=q.tag, summary=q.final, cutoffs=q.cutoffs)
            res["role"] = task.role
            out[site] = res
        return out

    def finetune(self, arrays: dict[str, Arrays], encoder: Encoders, request: Finetune) -> dict[str, dict[str, Any]]:
        from tace.client.finetune import finetune

        out: dict[str, dict[str, Any]] = {}
        for site, task in sorted(self.tasks.items()):
            if task.role == "train":
                r = finetune(
                    task, self._models(arrays, request.backbone), encoder, request.backbone, request.mode, request.epochs, 0.0, request.seed
                )
                out[site] = {k: v for k, v in r.to_dict().items() if k not in ("site", "mode", "lr")}
        return out
