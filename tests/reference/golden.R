# Golden values from R (pROC DeLong; survival survdiff / coxph / survfit) for the CSVs that
# make_reference_data.py writes. Run once, from the repository root:
#
#     .venv/bin/python tests/reference/make_reference_data.py
#     Rscript tests/reference/golden.R
#
# Writes tests/data/reference/r_golden.json. Needs R with pROC and survival only (Debian:
# r-base-core r-cran-proc r-cran-survival); the JSON is written by hand below so every double
# round-trips exactly (jsonlite stops at 15 significant digits).

suppressPackageStartupMessages({
  library(pROC)
  library(survival)
})

script_dir <- local({
  arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  if (length(arg)) dirname(normalizePath(sub("^--file=", "", arg[1]))) else file.path("tests", "reference")
})
data_dir <- normalizePath(file.path(script_dir, "..", "data", "reference"))

source(file.path(script_dir, "json_writer.R"))  # to_json(), arr()

# ---- ROC / DeLong --------------------------------------------------------------------------

roc_summary <- function(label, score) {
  r <- roc(label, score, levels = c(0, 1), direction = "<", quiet = TRUE)
  ci <- ci.auc(r, conf.level = 0.95, method = "delong")
  list(
    auc = as.numeric(r$auc),
    var = pROC::var(r, method = "delong"),
    ci_low = ci[1],
    ci_high = ci[3],
    n_cases = length(r$cases),
    n_controls = length(r$controls)
  )
}

scores_golden <- function(df) {
  ra <- roc(df$label, df$score_a, levels = c(0, 1), direction = "<", quiet = TRUE)
  rb <- roc(df$label, df$score_b, levels = c(0, 1), direction = "<", quiet = TRUE)
  test <- roc.test(ra, rb, method = "delong", paired = TRUE)
  sites <- sort(unique(df$site))
  per_site <- lapply(sites, function(s) {
    d <- df[df$site == s, ]
    roc_summary(d$label, d$score_a)
  })
  names(per_site) <- sites
  list(
    score_a = roc_summary(df$label, df$score_a),
    score_b = roc_summary(df$label, df$score_b),
    z = unname(test$statistic),  # paired DeLong test of score_a against score_b
    p = test$p.value,
    sites = per_site
  )
}

# ---- survival ------------------------------------------------------------------------------

logrank_summary <- function(sd) {
  # Degrees of freedom as print.survdiff computes them (groups with a positive expected count, minus one).
  obs <- if (is.matrix(sd$obs)) rowSums(sd$obs) else sd$obs
  exp <- if (is.matrix(sd$exp)) rowSums(sd$exp) else sd$exp
  df <- sum(exp > 0) - 1
  list(
    chisq = sd$chisq,
    df = as.integer(df),
    p = pchisq(sd$chisq, df, lower.tail = FALSE),
    obs = arr(unname(as.numeric(obs))),
    exp = arr(unname(as.numeric(exp))),
    n = arr(unname(as.integer(sd$n)))
  )
}

survival_golden <- function(df) {
  s <- Surv(df$time, df$event)
  group <- df$group
  group3 <- df$group3
  site <- df$site

  cox <- coxph(s ~ group, ties = "efron")
  cs <- summary(cox)
  cox_b <- coxph(s ~ group, ties = "breslow")

  km_ll <- survfit(s ~ 1, conf.type = "log-log")
  km_pl <- survfit(s ~ 1, conf.type = "plain")
  km_lg <- survfit(s ~ 1, conf.type = "log")

  strat <- survdiff(s ~ group + strata(site))
  strat_sum <- logrank_summary(strat)

  # Flat layout: the two-group log-rank, the Efron Cox fit and the KM curve at the top level; the rest nested.
  c(
    logrank_summary(survdiff(s ~ group)),
    list(
      coef = unname(coef(cox)),
      se = unname(sqrt(diag(vcov(cox)))),
      hr = unname(cs$conf.int[1, "exp(coef)"]),
      hr_low = unname(cs$conf.int[1, "lower .95"]),
      hr_high = unname(cs$conf.int[1, "upper .95"]),
      z = unname(cs$coefficients[1, "z"]),
      p_wald = unname(cs$coefficients[1, "Pr(>|z|)"]),
      p_lr = unname(cs$logtest["pvalue"]),
      p_score = unname(cs$sctest["pvalue"]),
      loglik = arr(unname(cox$loglik)),
      concordance = unname(cs$concordance[1]),
      concordance_se = unname(cs$concordance[2]),
      km_time = arr(km_ll$time),
      km_surv = arr(km_ll$surv),
      km_n_risk = arr(as.integer(km_ll$n.risk)),
      km_n_event = arr(as.integer(km_ll$n.event)),
      km_n_censor = arr(as.integer(km_ll$n.censor)),
      km_std_err = arr(km_ll$std.err),
      km_lower = arr(km_ll$lower),
      km_upper = arr(km_ll$upper),
      km_lower_plain = arr(km_pl$lower),
      km_upper_plain = arr(km_pl$upper),
      km_lower_log = arr(km_lg$lower),
      km_upper_log = arr(km_lg$upper),
      logrank3 = logrank_summary(survdiff(s ~ group3)),
      cox_breslow = list(
        coef = unname(coef(cox_b)),
        se = unname(sqrt(diag(vcov(cox_b))))
      ),
      logrank_strat = list(chisq = strat_sum$chisq, df = strat_sum$df, p = strat_sum$p)
    )
  )
}

# ---- main ----------------------------------------------------------------------------------

out <- list(
  `_versions` = list(
    R = R.version.string,
    pROC = as.character(packageVersion("pROC")),
    survival = as.character(packageVersion("survival"))
  ),
  `_notes` = list(
    roc = paste(
      "pROC roc(label, score, levels=c(0,1), direction='<'); var(method='delong');",
      "ci.auc(method='delong', conf.level=0.95), which pROC clips to [0, 1];",
      "z, p = roc.test(roc_a, roc_b, method='delong', paired=TRUE) (z = (AUC_a - AUC_b) / SE, two-sided p);",
      "sites holds score_a per site."
    ),
    survival = paste(
      "chisq/df/p/obs/exp/n = survdiff(Surv(time, event) ~ group), logrank3 = the same for ~ group3,",
      "obs/exp/n in sorted level order, p = pchisq(chisq, df, lower.tail=FALSE);",
      "coef/se/hr/hr_low/hr_high/z/p_wald/p_lr/p_score/loglik = coxph(~ group, ties='efron') (95% Wald HR CI),",
      "concordance = summary(fit)$concordance[1]; cox_breslow = ties='breslow';",
      "km_* = survfit(~ 1) at every distinct time (censor-only times included), km_std_err = SE of the cumulative",
      "hazard (Greenwood), km_lower/km_upper = conf.type 'log-log' (null where surv is 0 or 1),",
      "km_*_plain = 'plain' (clipped to [0, 1]), km_*_log = 'log' (R's default);",
      "logrank_strat = survdiff(~ group + strata(site))."
    )
  )
)

for (name in c("scores_generated", "breast_cancer_scores")) {
  df <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  out[[name]] <- scores_golden(df)
}
for (name in c("survival_generated", "rossi", "waltons")) {
  df <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  out[[name]] <- survival_golden(df)
}

path <- file.path(data_dir, "r_golden.json")
writeLines(to_json(out), path)
cat("wrote", path, "\n")
