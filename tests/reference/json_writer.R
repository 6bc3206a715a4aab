# The golden scripts' JSON writer (sourced by golden.R and golden_validation.R): every double is written with
# the shortest representation that reads back to the same value (jsonlite stops at 15 significant digits).

# A numeric of length 1 is written as a scalar unless wrapped in arr(); NA/NaN/Inf become null.

arr <- function(x) structure(x, class = c("json_array", class(x)))

num_str <- function(x) {
  vapply(x, function(v) {
    if (is.na(v) || !is.finite(v)) return("null")
    if (is.integer(v)) return(sprintf("%d", v))
    for (d in 15:17) {  # shortest representation that reads back to the same double
      s <- sprintf(paste0("%.", d, "g"), v)
      if (as.numeric(s) == v) return(s)
    }
    s
  }, character(1))
}

to_json <- function(x, indent = 0) {
  pad <- strrep("  ", indent + 1)
  end <- strrep("  ", indent)
  if (is.list(x)) {
    if (!length(x)) return("{}")
    keys <- names(x)
    items <- vapply(seq_along(x), function(i) {
      paste0(pad, '"', keys[i], '": ', to_json(x[[i]], indent + 1))
    }, character(1))
    return(paste0("{\n", paste(items, collapse = ",\n"), "\n", end, "}"))
  }
  as_array <- inherits(x, "json_array") || length(x) != 1
  x <- unclass(x)
  vals <- if (is.character(x)) {
    paste0('"', gsub('"', '\\\\"', x), '"')
  } else if (is.logical(x)) {
    ifelse(is.na(x), "null", ifelse(x, "true", "false"))
  } else {
    num_str(x)
  }
  if (as_array) paste0("[", paste(vals, collapse = ", "), "]") else vals
}

