#!/usr/bin/env bash
# Prepare a three-site pilot in folder $1 (default ./pilot): a synthetic cohort, a study folder with its CA and
# server certificate, one key pair and one site.toml per site, registered with the coordinator.
# For containers (compose.yaml) the coordinator is reachable as "coordinator"; on one machine use --host localhost.
set -euo pipefail
PILOT=${1:-pilot}
HOST=${COORDINATOR_HOST:-coordinator}
mkdir -p "$PILOT"
tace-sim cohort --preset tiny --n-sites 4 --out "$PILOT/cohort"          # site-a, site-b train; site-c holdout
tace-server init "$PILOT/study" --name "TACE-FL pilot" --host "$HOST" --host localhost --expected-sites 3
sed -i 's/^holdout-sites = .*/holdout-sites = "site-c"/' "$PILOT/study/run_config.toml"
for site in site-a site-b site-c; do
  mkdir -p "$PILOT/config/$site" "$PILOT/$site"
  tace-client keygen --site "$site" --out "$PILOT/config/$site"
  tace-server sites add "$site" "$PILOT/config/$site/$site.pub" --study "$PILOT/study"
  cp "$PILOT/study/pki/ca.crt" "$PILOT/config/$site/ca.crt"
  cat > "$PILOT/config/$site/site.toml" <<TOML
[site]
id = "$site"
manifest = "/data/sites/$site/manifest.csv"
cache = "/work/cache"
output = "/work/output"
[coordinator]
address = "$HOST:9092"
ca-certificate = "ca.crt"
[auth]
private-key = "$site.key"
[compute]
device = "auto"
threads = 1
TOML
done
echo "pilot ready in $PILOT: start the coordinator with tace-server start --study $PILOT/study (or docker compose, see compose.yaml)"
