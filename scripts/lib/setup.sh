# Shared set-up for ./scripts/test and ./scripts/demo; sourced, not run.
# Installs what a fresh Debian/Ubuntu machine lacks (as root), then the
# project into one virtualenv, .venv/, and links `hpresilience` onto PATH.

hpr_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
hpr_venv="$hpr_repo/.venv"

hpr_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

hpr_apt_install() {
    local missing=()
    [ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null || missing+=(slurmctld)
    [ -x /usr/sbin/slurmd ] || command -v slurmd >/dev/null || missing+=(slurmd)
    command -v scontrol >/dev/null || missing+=(slurm-client)
    [ -x /usr/sbin/munged ] || command -v munged >/dev/null || missing+=(munge)
    command -v unshare >/dev/null || missing+=(util-linux)
    command -v stress-ng >/dev/null || missing+=(stress-ng)   # the cpu_memory deep check (issue 10)
    { command -v promtool && command -v prometheus; } >/dev/null || missing+=(prometheus)  # promtool: the rules' tests; prometheus: the live dashboard test (issue 12)
    command -v chromium >/dev/null || missing+=(chromium)  # the drill's HTML report, rendered in a real headless browser by a test (issue 13)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "missing: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
        return 1
    fi
    hpr_log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The optional dependencies installed: all of them, except where HPR_EXTRAS says otherwise (the container
# image sets `test`: no torch, issue 14).
hpr_extras="${HPR_EXTRAS:-test,examples}"

hpr_venv_install() {
    # Reinstall only when the dependency list or the extras changed: a warm run costs nothing. The
    # container image runs this too, so ./scripts/test inside it installs nothing again (issue 14).
    local stamp="$hpr_venv/.hpr-installed" want
    want="$(sha256sum "$hpr_repo/pyproject.toml" | cut -d' ' -f1) [$hpr_extras]"
    if [ -x "$hpr_venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    hpr_log "installing hpresilience[$hpr_extras] into $hpr_venv"
    python3 -m venv "$hpr_venv"
    "$hpr_venv/bin/python" -m pip install -q --disable-pip-version-check -e "$hpr_repo[$hpr_extras]"
    echo "$want" > "$stamp"
}

hpr_link_cli() {
    # After ./scripts/test or ./scripts/demo, `hpresilience` is on PATH.
    if [ "$(id -u)" = 0 ] && [ -d /usr/local/bin ]; then
        ln -sfn "$hpr_venv/bin/hpresilience" /usr/local/bin/hpresilience
    fi
}

hpr_setup() {
    hpr_apt_install
    hpr_venv_install
    hpr_link_cli
}
