# Golden values from R for the validation statistics of issue 19: logistic recalibration (calibration intercept
# and slope, glm by hand and rms::val.prob), O/E, the flexible calibration curve (restricted cubic spline, rms::rcs)
# with its band and ICI/E50/E90/Emax, and the random-effects meta-analysis across centres (metafor::rma, Paule-Mandel,
# with and without Hartung-Knapp; prediction interval predict(pi.type = "riley")). Run once, from the repository root:
#
#     .venv/bin/python tests/reference/make_reference_data.py
#     Rscript tests/reference/golden_validation.R
#
# Writes tests/data/reference/r_golden_validation.json. Needs R with pROC, rms and metafor (Debian: r-base-core
# r-cran-proc r-cran-rms r-cran-metafor).

suppressPackageStartupMessages({
  library(pROC)
  library(rms)
  library(metafor)
})

script_dir <- local({
  arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  if (length(arg)) dirname(normalizePath(sub("^--file=", "", arg[1]))) else file.path("tests", "reference")
})
data_dir <- normalizePath(file.path(script_dir, "..", "data", "reference"))
source(file.path(script_dir, "json_writer.R"))  # to_json(), arr()

EPS <- 1e-6
AT <- c(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # where the flexible curve is compared
tight <- glm.control(epsilon = 1e-14, maxit = 200)

# ---- calibration ---------------------------------------------------------------------------

wald <- function(fit, i) {
  est <- unname(coef(fit)[i])
  se <- unname(sqrt(diag(vcov(fit)))[i])
  ci <- unname(confint.default(fit)[i, ])
  list(value = est, se = se, low = ci[1], high = ci[2])
}

calibration_golden <- function(y, score) {
  p <- pmin(pmax(score, EPS), 1 - EPS)
  lp <- qlogis(p)
  slope_fit <- glm(y ~ lp, family = binomial, control = tight)
  citl_fit <- glm(y ~ 1, offset = lp, family = binomial, control = tight)
  O <- sum(y)
  E <- sum(p)
  N <- length(y)
  se_log <- sqrt(1 / O - 1 / N)
  knots <- unname(quantile(lp, c(0.1, 0.5, 0.9)))  # type 7, as numpy's default
  flex <- glm(y ~ rcs(lp, knots), family = binomial, control = tight)
  err <- abs(fitted(flex) - p)
  at <- predict(flex, newdata = data.frame(lp = qlogis(AT)), type = "link", se.fit = TRUE)
  vp <- val.prob(p, y, pl = FALSE)
  list(
    n = N, observed = O, expected = E,
    intercept = wald(citl_fit, 1),
    slope = wald(slope_fit, 2),
    oe = list(value = O / E, se_log = se_log, low = O / E * exp(-qnorm(0.975) * se_log), high = O / E * exp(qnorm(0.975) * se_log)),
    knots = arr(knots),
    ici = mean(err), e50 = median(err), e90 = unname(quantile(err, 0.9)), emax = max(err),
    curve_at = arr(AT),
    curve = arr(plogis(at$fit)),
    curve_low = arr(plogis(at$fit - qnorm(0.975) * at$se.fit)),
    curve_high = arr(plogis(at$fit + qnorm(0.975) * at$se.fit)),
    val_prob_slope = unname(vp["Slope"]),
    val_prob_intercept = unname(vp["Intercept"])
  )
}

# ---- meta-analysis across centres ----------------------------------------------------------

centre_inputs <- function(df, score) {
  sites <- sort(unique(df$site))
  rows <- lapply(sites, function(s) {
    d <- df[df$site == s, ]
    p <- pmin(pmax(d[[score]], EPS), 1 - EPS)
    r <- roc(d$label, p, levels = c(0, 1), direction = "<", quiet = TRUE)
    auc <- as.numeric(r$auc)
    v <- pROC::var(r, method = "delong")
    fit <- glm(d$label ~ qlogis(p), family = binomial, control = tight)
    O <- sum(d$label)
    c(auc = qlogis(auc), auc_v = v / (auc * (1 - auc))^2,
      slope = unname(coef(fit)[2]), slope_v = unname(vcov(fit)[2, 2]),
      oe = log(O / sum(p)), oe_v = 1 / O - 1 / nrow(d))
  })
  m <- do.call(rbind, rows)
  rownames(m) <- sites
  m
}

rma_summary <- function(yi, vi, test) {
  fit <- rma(yi = yi, vi = vi, method = "PM", test = test, control = list(tol = 1e-14, maxiter = 1000))
  pr <- predict(fit, pi.type = "riley")
  list(
    pooled = as.numeric(fit$b), se = fit$se, ci_low = fit$ci.lb, ci_high = fit$ci.ub,
    tau2 = fit$tau2, i2 = fit$I2 / 100, q = fit$QE, q_p = fit$QEp,
    pi_low = pr$pi.lb, pi_high = pr$pi.ub,
    weights = arr(unname(weights(fit)) / 100)
  )
}

meta_golden <- function(df, score) {
  m <- centre_inputs(df, score)
  out <- list(centres = arr(rownames(m)))
  for (measure in c("auc", "slope", "oe")) {
    yi <- m[, measure]
    vi <- m[, paste0(measure, "_v")]
    out[[measure]] <- list(
      yi = arr(unname(yi)), vi = arr(unname(vi)),
      z = rma_summary(yi, vi, "z"),
      knha = rma_summary(yi, vi, "knha")
    )
  }
  out
}

# ---- main ----------------------------------------------------------------------------------

out <- list(
  `_versions` = list(
    R = R.version.string,
    pROC = as.character(packageVersion("pROC")),
    rms = as.character(packageVersion("rms")),
    metafor = as.character(packageVersion("metafor"))
  ),
  `_notes` = list(
    calibration = paste(
      "p = score clipped to [1e-6, 1 - 1e-6], lp = qlogis(p); slope = glm(y ~ lp), intercept = glm(y ~ 1, offset = lp)",
      "(calibration-in-the-large), Wald CIs (confint.default); oe = sum(y) / sum(p) with CI exp(log(O/E) +- 1.96 sqrt(1/O - 1/N));",
      "flexible curve = glm(y ~ rcs(lp, knots)) with knots = quantile(lp, c(.1, .5, .9)); ici/e50/e90/emax = mean/median/",
      "quantile(.9)/max of |fitted - p|; curve, curve_low, curve_high = plogis(link +- 1.96 se) at p = curve_at;",
      "val_prob_* = rms::val.prob(p, y) Slope and Intercept (the intercept of y ~ lp, not calibration-in-the-large)."
    ),
    meta = paste(
      "per centre (sorted site ids): auc = qlogis(AUC) with vi = var_DeLong / (AUC (1 - AUC))^2 (pROC);",
      "slope = glm(y ~ qlogis(p)) with vi = its variance; oe = log(O / sum(p)) with vi = 1/O - 1/N;",
      "z / knha = metafor rma(yi, vi, method = 'PM', test = 'z' / 'knha'); i2 = I2 / 100; weights = weights(fit) / 100;",
      "pi = predict(fit, pi.type = 'riley') (t with k - 2 df, at least 1)."
    )
  )
)

for (name in c("validation_generated", "breast_cancer_scores", "scores_generated")) {
  df <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  out[[name]] <- list(
    score_a = calibration_golden(df$label, df$score_a),
    score_b = calibration_golden(df$label, df$score_b),
    meta_a = meta_golden(df, "score_a"),
    meta_b = meta_golden(df, "score_b")
  )
}

path <- file.path(data_dir, "r_golden_validation.json")
writeLines(to_json(out), path)
cat("wrote", path, "\n")
