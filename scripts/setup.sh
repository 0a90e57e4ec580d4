#!/usr/bin/env bash
# Bring up what Sluice needs on a Debian (12) machine: RabbitMQ, PostgreSQL with
# the `sluice` database, a Rust toolchain, and (with --with-browser) Chromium and
# chromedriver for the browser tests.
#
# Idempotent and non-interactive: run it as often as you like, as root or as a
# user with sudo. Where the servers already answer on 127.0.0.1 it only checks
# them and creates what is missing.
#
#   scripts/setup.sh [--with-browser]
#
# What it may change on a fresh machine:
# - apt-get installs rabbitmq-server, postgresql, openssl (and chromium chromium-driver)
#   when missing, plus gcc/libc6-dev when no C linker is found (cargo needs one);
# - starts RabbitMQ (`rabbitmq-server -detached`) and the PostgreSQL cluster
#   (`pg_ctlcluster <version> main start`) when their ports do not answer; no
#   systemd is needed;
# - if user `postgres` cannot log in over TCP without a password (Debian's
#   default is scram-sha-256), adds two lines at the top of pg_hba.conf,
#   marked "sluice setup", trusting user postgres from 127.0.0.1 and ::1 only,
#   and reloads. That matches the project's default DATABASE_URL
#   (postgres://postgres@127.0.0.1:5432/sluice). It is a development/CI
#   setting: on a shared machine, set a password and put it in DATABASE_URL
#   instead (remove the marked lines);
# - creates the database `sluice` if it does not exist;
# - gives PostgreSQL a server certificate the TLS tests can verify
#   (sslmode=verify-full): a private CA and a certificate for 127.0.0.1 and
#   localhost, made with openssl in /var/lib/postgresql/sluice-tls/ (ca.pem,
#   readable by all, is what clients trust; server.key is the postgres
#   user's, mode 0600), then `ALTER SYSTEM SET ssl = on, ssl_cert_file,
#   ssl_key_file` and `pg_reload_conf()` (never a restart). Plain and
#   sslmode=prefer/require connections keep working as before. Skipped when
#   the server already uses that certificate; SLUICE_SETUP_PG_TLS=0 skips it.
set -euo pipefail

WITH_BROWSER=0
for arg in "$@"; do
    case "$arg" in
        --with-browser) WITH_BROWSER=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive
PG_HOST=127.0.0.1
PG_PORT=5432
AMQP_PORT=5672
DB_NAME=sluice

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# Root runs commands directly; anyone else goes through sudo (non-interactive).
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    command -v sudo >/dev/null || die "not root and sudo is not installed"
    SUDO=(sudo -n)
fi
as_root() { "${SUDO[@]}" "$@"; }
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        sudo -n -u postgres "$@"
    fi
}

# Does something accept TCP connections on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND once a second.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local i
    for ((i = 0; i < seconds; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    die "$what not ready after ${seconds}s"
}

# ---------------------------------------------------------------- packages
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
# A server already answering (e.g. started by hand or in another container) is
# good enough: its package is not required.
if ! port_open "$AMQP_PORT" && ! command -v rabbitmq-server >/dev/null && ! installed rabbitmq-server; then
    missing+=(rabbitmq-server)
fi
if ! port_open "$PG_PORT" && ! installed postgresql; then
    missing+=(postgresql)
fi
command -v psql >/dev/null || missing+=(postgresql-client)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
# The PostgreSQL test certificate below is made with openssl.
if [ "${SLUICE_SETUP_PG_TLS:-1}" != 0 ]; then
    command -v openssl >/dev/null || missing+=(openssl)
fi
if [ "$WITH_BROWSER" = 1 ]; then
    command -v chromium >/dev/null || installed chromium || missing+=(chromium)
    command -v chromedriver >/dev/null || installed chromium-driver || missing+=(chromium-driver)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available: install them by hand"
    say "installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "packages: nothing to install"
fi

# ---------------------------------------------------------------- RabbitMQ
if port_open "$AMQP_PORT"; then
    say "rabbitmq: answering on 127.0.0.1:$AMQP_PORT"
else
    if as_root rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        say "rabbitmq: node running, waiting for its AMQP listener"
    else
        say "rabbitmq: starting (rabbitmq-server -detached)"
        # The Debian wrapper switches to the rabbitmq user itself.
        as_root rabbitmq-server -detached
        wait_for 90 "rabbitmq (ping)" as_root rabbitmq-diagnostics -q ping
    fi
    wait_for 60 "rabbitmq (port $AMQP_PORT)" port_open "$AMQP_PORT"
    say "rabbitmq: up on 127.0.0.1:$AMQP_PORT"
fi

# ---------------------------------------------------------------- PostgreSQL
pg_version() {
    # The newest installed server version with a cluster configuration, else the newest installed.
    local v
    v=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
    [ -n "$v" ] || v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1)
    printf '%s' "$v"
}

if port_open "$PG_PORT"; then
    say "postgresql: answering on $PG_HOST:$PG_PORT"
else
    version=$(pg_version)
    [ -n "$version" ] || die "postgresql is not installed and nothing answers on port $PG_PORT"
    if [ ! -d "/etc/postgresql/$version/main" ]; then
        say "postgresql: creating cluster $version/main"
        as_root pg_createcluster "$version" main >/dev/null
    fi
    say "postgresql: starting cluster $version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for 60 "postgresql" pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
    say "postgresql: up on $PG_HOST:$PG_PORT"
fi
wait_for 30 "postgresql" pg_isready -q -h "$PG_HOST" -p "$PG_PORT"

# psql as user postgres over TCP, never prompting for a password.
pg() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -X -q -At "$@"; }

if ! pg -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    say "postgresql: user postgres needs a password over TCP; trusting it from loopback (pg_hba.conf)"
    hba=$(as_postgres psql -X -At -c 'SHOW hba_file') ||
        die "cannot reach PostgreSQL as the postgres OS user either; fix authentication by hand"
    if ! as_root grep -q 'sluice setup' "$hba"; then
        tmp=$(mktemp)
        {
            echo "host all postgres 127.0.0.1/32 trust # sluice setup: passwordless postgres on loopback"
            echo "host all postgres ::1/128 trust # sluice setup: passwordless postgres on loopback"
            as_root cat "$hba"
        } >"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
    as_postgres psql -X -q -At -c 'SELECT pg_reload_conf()' >/dev/null
    wait_for 10 "postgresql (trust login)" pg -d postgres -c 'SELECT 1'
fi

if [ "$(pg -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" = 1 ]; then
    say "postgresql: database $DB_NAME exists"
else
    say "postgresql: creating database $DB_NAME"
    pg -d postgres -c "CREATE DATABASE $DB_NAME"
fi

# ---------------------------------------------------------------- PostgreSQL TLS
# A private CA and a server certificate for 127.0.0.1/localhost, so that the
# TLS tests can connect with sslmode=verify-full (tests/tls reads ca.pem).
PG_TLS_DIR=/var/lib/postgresql/sluice-tls
pg_tls_ready() {
    [ "$(pg -d postgres -c 'SHOW ssl')" = on ] &&
        [ "$(pg -d postgres -c 'SHOW ssl_cert_file')" = "$PG_TLS_DIR/server.pem" ] &&
        psql "host=$PG_HOST port=$PG_PORT user=postgres dbname=postgres sslmode=verify-full sslrootcert=$PG_TLS_DIR/ca.pem" \
            -w -X -q -At -c 'SELECT 1' >/dev/null 2>&1
}
if [ "${SLUICE_SETUP_PG_TLS:-1}" = 0 ]; then
    say "postgresql tls: skipped (SLUICE_SETUP_PG_TLS=0)"
elif pg_tls_ready; then
    say "postgresql tls: serving $PG_TLS_DIR/server.pem (verify-full works)"
else
    command -v openssl >/dev/null || die "openssl is needed to make the PostgreSQL test certificate"
    say "postgresql tls: making a CA and a server certificate in $PG_TLS_DIR"
    tmp=$(mktemp -d)
    openssl req -x509 -new -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sluice test CA" \
        -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$tmp/ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
        -days 3650 -extfile "$tmp/ext" -out "$tmp/server.pem" 2>/dev/null
    as_root mkdir -p "$PG_TLS_DIR"
    as_root install -m 0644 "$tmp/ca.pem" "$PG_TLS_DIR/ca.pem"
    as_root install -m 0644 "$tmp/server.pem" "$PG_TLS_DIR/server.pem"
    as_root install -m 0600 "$tmp/server.key" "$PG_TLS_DIR/server.key"
    as_root chown -R postgres:postgres "$PG_TLS_DIR"
    rm -rf "$tmp"
    pg -d postgres -c "ALTER SYSTEM SET ssl_cert_file = '$PG_TLS_DIR/server.pem'"
    pg -d postgres -c "ALTER SYSTEM SET ssl_key_file = '$PG_TLS_DIR/server.key'"
    pg -d postgres -c "ALTER SYSTEM SET ssl = on"
    pg -d postgres -c 'SELECT pg_reload_conf()' >/dev/null
    wait_for 10 "postgresql (verify-full with $PG_TLS_DIR/ca.pem)" pg_tls_ready
    say "postgresql tls: serving $PG_TLS_DIR/server.pem"
fi

# ---------------------------------------------------------------- Rust
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
    die "cargo not found. Install Rust (1.85 or newer) with rustup, then re-run:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
    . \"\$HOME/.cargo/env\""
fi
say "rust: $(cargo --version)"
for component in fmt clippy; do
    if ! cargo "$component" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null; then
            name=$([ "$component" = fmt ] && echo rustfmt || echo clippy)
            say "rust: adding component $name"
            rustup component add "$name" >/dev/null
        else
            say "rust: warning: cargo $component is missing (needed by scripts/test.sh)"
        fi
    fi
done

if [ "$WITH_BROWSER" = 1 ]; then
    say "browser: $(chromium --version 2>/dev/null || echo 'chromium missing'), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2 || echo 'chromedriver missing')"
fi
say "ready"
