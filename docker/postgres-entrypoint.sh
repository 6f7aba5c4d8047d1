#!/bin/sh
# PostgreSQL from Debian's package, started as the official image is: on the first start (an empty $PGDATA) a
# cluster is made whose superuser is $POSTGRES_USER (default postgres) with $POSTGRES_PASSWORD (required), and the
# database $POSTGRES_DB (default: the user's name) is created; clients on the network authenticate with
# scram-sha-256. Then the server replaces this shell (exec), so it is PID 1 and gets the stop signal itself.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user="${POSTGRES_USER:-postgres}"
database="${POSTGRES_DB:-$user}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file="$(mktemp)"
    printf '%s' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$password_file" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses=''" --wait --silent start
    if [ "$database" != postgres ]; then
        createdb --username="$user" "$database"
    fi
    pg_ctl --pgdata="$PGDATA" --mode=fast --wait --silent stop
    echo "postgres-entrypoint: cluster initialised (user $user, database $database)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
