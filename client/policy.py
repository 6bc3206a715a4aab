"""The site's own rules for taking part, from its configuration: what it refuses, whatever the coordinator asks.

A hospital sets these in its site.toml / node config (``require-dp``, ``require-secagg``; docs/privacy.md); the
run configuration comes from the coordinator. Every refusal is a `SiteRefusal` with its reason code, so the
coordinator can tell a site that declines from one that failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tace.common.config import RunConfig, SiteConfig
from tace.common.protocol import Failure, Reason, SiteRefusal

_SAMPLE_DP = "the coordinator sets run-config dp=true and dp-mode='sample'"
_SECAGG = "the coordinator sets run-config secagg=true"


@dataclass(frozen=True)
class SitePolicy:
    """What this site agrees to in this run."""

    site: SiteConfig
    run: RunConfig

    def join_refusal(self) -> Failure | None:
        """Why this site cannot take part in this run at all (asked when the coordinator looks for sites)."""
        if self.site.require_secagg and not self.run.secagg:
            return Failure(Reason.REQUIRES_SECAGG, "this site sends its weights only masked by secure aggregation (its node config "
                                                   "require-secagg): the coordinator must set run-config secagg=true")  # fmt: skip
        if self.site.require_dp and not self.run.sample_dp:
            return Failure(Reason.REQUIRES_DP, "this site takes part only in runs with sample-level differential privacy (its node "
                                               "config require-dp): the coordinator must set run-config dp=true and dp-mode='sample'")  # fmt: skip
        return None

    def allow_training(self) -> None:
        if self.site.require_dp and not self.run.sample_dp:
            raise SiteRefusal(Reason.REQUIRES_DP, "this site trains only with sample-level differential privacy (its node config "
                                                  "require-dp) and the run has it off", _SAMPLE_DP)  # fmt: skip

    def allow_statistics(self) -> None:
        if self.run.dp or self.site.require_dp:
            raise SiteRefusal(Reason.NOT_UNDER_DP, "this site sends no clinical statistics in a run with differential privacy (or "
                                                   "when its node config require-dp is set): they are not covered by its privacy "
                                                   "account", "the coordinator uses the reference encoder")  # fmt: skip

    def allow_finetuning(self) -> None:
        if self.run.dp:
            raise SiteRefusal(Reason.NOT_UNDER_DP, "this site does not fine-tune in a run with differential privacy: the fine-tuned "
                                                   "model's AUC would leave outside its privacy account",
                              "fine-tune locally with `tace-client finetune`, where nothing leaves")  # fmt: skip

    def allow_weights_in_clear(self) -> None:
        """A train message without secure aggregation: the weights would leave unmasked."""
        if self.site.require_secagg:
            raise SiteRefusal(Reason.REQUIRES_SECAGG, "this site sends its weights only masked (its node config require-secagg) and "
                                                      "the coordinator asked for them in the clear", _SECAGG)  # fmt: skip
