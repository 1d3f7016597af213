#!/usr/bin/env bash
# portico's Debian package, end to end, on this machine:
#   build it (`cargo deb`, Cargo.toml's package-test profile), check its control fields and
#   file list (dpkg-deb -f / -c), its conffiles and maintainer scripts; install
#   it (dpkg -i); run the installed /usr/bin/portico (--version, check of the
#   default config, as root and as the portico user); check the user, the
#   groups, /etc/portico's mode, the unit (systemd-analyze verify, security);
#   upgrade to a second build (a modified conffile is kept); lintian (no
#   errors); purge (what must go is gone, a certificate the user put in
#   /etc/portico stays).
#
# Usage:  tests/package/run.sh     (scripts/test-all installs cargo-deb, lintian, ...)
# Needs root (dpkg -i / --purge): without it every check fails, saying so.
# Refuses, as a failure, to run where portico is already installed (as a
# package, or by hand in /etc/portico or /var/lib/portico): purging would
# remove that installation's config and state.
# Restores the machine: the package is purged, and the users and groups its
# postinst created (and that did not exist before) are removed again.
#
# Output: `ok - NAME` / `not ok - NAME: why` per check, then `N passed, N failed`.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac
cd "$ROOT" || exit 1

PASSED=0
FAILED=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/portico-package.XXXXXX") || {
    echo "not ok - setup: mktemp failed"
    echo "0 passed, 1 failed"
    exit 1
}

# fail WHY: the check stops here with WHY as its reason (checks run in a subshell).
fail() {
    printf '%s\n' "$*"
    exit 1
}

# check NAME CMD...: run CMD in a subshell with its output captured; count and report it.
check() {
    local name=$1 rc why
    shift
    local out="$WORK/check-$((PASSED + FAILED + 1)).out"
    ("$@") >"$out" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
    else
        FAILED=$((FAILED + 1))
        why=$(grep -v '^[[:space:]]*$' "$out" | tail -n1)
        echo "not ok - $name: ${why:-exit status $rc}"
        grep -v '^[[:space:]]*$' "$out" | head -n -1 | tail -n 30 | sed 's/^/#   /'
    fi
    return 0
}

finish() {
    echo "$PASSED passed, $FAILED failed"
    [[ $FAILED -eq 0 ]]
    exit
}

# refuse WHY: this machine cannot run the checks; that is a failure, not a skip.
refuse() {
    echo "not ok - package: $*"
    FAILED=$((FAILED + 1))
    finish
}

# ------------------------------------------------------------ preconditions

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
ARCH=$(dpkg --print-architecture 2>/dev/null)
DEB_VERSION=$VERSION-1
DEB=target/debian/portico_${DEB_VERSION}_${ARCH}.deb
UPGRADE_VERSION=$VERSION-2
UPGRADE_DEB= # set once $WORK exists
UNIT=/usr/lib/systemd/system/portico.service

if [[ $(id -u) -ne 0 ]]; then
    refuse "needs root to install and purge the package (dpkg -i, dpkg --purge); run it as root (CI does)"
fi
missing=()
for tool in cargo-deb dpkg-deb dpkg-statoverride lintian systemd-analyze adduser runuser readelf git; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    refuse "missing tools: ${missing[*]} (scripts/test-all installs them)"
fi
if [[ -z $VERSION || -z $ARCH ]]; then
    refuse "cannot read the version from Cargo.toml ($VERSION) or dpkg's architecture ($ARCH)"
fi
if status=$(dpkg-query -W -f '${Status} ${Version}' portico 2>/dev/null) && [[ $status != *not-installed* ]]; then
    refuse "a portico package is already here ($status): this test installs and purges its own, which would remove that one's config; run 'apt purge portico' first or test on another machine"
fi
for path in /etc/portico /var/lib/portico /usr/bin/portico; do
    if [[ -e $path ]]; then
        refuse "$path exists (portico installed by hand?): installing and purging the package here would replace or remove it; move it away first or test on another machine"
    fi
done

# Users and groups that exist now are left alone; the ones the package creates are removed at the end.
PRE_USERS=()
for u in portico; do getent passwd "$u" >/dev/null && PRE_USERS+=("$u"); done
PRE_GROUPS=()
for g in portico certreaders; do getent group "$g" >/dev/null && PRE_GROUPS+=("$g"); done
existed() {
    local x
    for x in "${@:2}"; do [[ $x == "$1" ]] && return 0; done
    return 1
}

cleanup() {
    if dpkg-query -W -f '${Status}' portico 2>/dev/null | grep -qv not-installed; then
        dpkg --purge portico >/dev/null 2>&1 || echo "# cleanup: dpkg --purge portico failed" >&2
    fi
    rm -f /etc/portico/user-provided.pem
    rmdir /etc/portico 2>/dev/null
    rm -rf /var/lib/portico
    if ! existed portico "${PRE_USERS[@]}" && getent passwd portico >/dev/null; then
        deluser --system --quiet portico >/dev/null 2>&1 || userdel portico
    fi
    local g
    for g in portico certreaders; do
        if ! existed "$g" "${PRE_GROUPS[@]}" && getent group "$g" >/dev/null; then
            delgroup --system --quiet "$g" >/dev/null 2>&1 || groupdel "$g"
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ build

# cargo-deb replaces older builds of the package in target/debian: the upgrade goes elsewhere.
UPGRADE_DEB=$WORK/portico_${UPGRADE_VERSION}_${ARCH}.deb

build() {
    local t=$SECONDS
    rm -f target/debian/portico_*.deb target/debian/portico-dbgsym_*.ddeb
    # The package-test profile (Cargo.toml): the release packaging, built
    # about twice as fast; what this suite checks does not depend on LTO.
    cargo deb --profile package-test || fail "cargo deb --profile package-test failed"
    [[ -f $DEB ]] || fail "cargo deb did not write $DEB: $(ls target/debian 2>&1)"
    echo "# built $DEB ($(stat -c %s "$DEB") bytes) in $((SECONDS - t))s"
    # The same build, numbered as the next revision: the upgrade below.
    # (cargo-deb removes the other builds of the package from target/debian.)
    cp "$DEB" "$WORK/" || fail "cp $DEB $WORK/"
    cargo deb --profile package-test --no-build --no-dbgsym --strip --deb-version "$UPGRADE_VERSION" --output "$UPGRADE_DEB" ||
        fail "cargo deb --no-build --deb-version $UPGRADE_VERSION failed"
    [[ -f $UPGRADE_DEB ]] || fail "no $UPGRADE_DEB"
    [[ -f $DEB ]] || cp "$WORK/${DEB##*/}" "$DEB" || fail "cannot restore $DEB"
}
check "build: cargo deb writes $DEB" build
if [[ ! -f $DEB ]]; then
    finish
fi
echo "# $(stat -c %s "$DEB") bytes, installed size $(dpkg-deb -f "$DEB" Installed-Size) KiB"

# field NAME: the control field of the package.
field() { dpkg-deb -f "$DEB" "$1"; }

check_control() {
    [[ $(field Package) == portico ]] || fail "Package: $(field Package)"
    [[ $(field Version) == "$DEB_VERSION" ]] || fail "Version: $(field Version), want $DEB_VERSION"
    [[ $(field Architecture) == "$ARCH" ]] || fail "Architecture: $(field Architecture), want $ARCH"
    [[ $(field Section) == net ]] || fail "Section: $(field Section)"
    [[ $(field Priority) == optional ]] || fail "Priority: $(field Priority)"
    [[ $(field Maintainer) == *@* ]] || fail "Maintainer: $(field Maintainer)"
    local depends
    depends=$(field Depends)
    [[ $depends == *adduser* ]] || fail "Depends lacks adduser (postinst uses it): $depends"
    [[ $depends == *libc6* ]] || fail "Depends lacks libc6 (\$auto from the binary): $depends"
    [[ $(field Description) == *"port 443"* ]] || fail "Description: $(field Description)"
    echo "# Depends: $depends"
}
check "control: Package, Version $DEB_VERSION, Architecture, Section, Priority, Maintainer, Depends, Description" check_control

check_files() {
    dpkg-deb -c "$DEB" | awk '{print $1, $6}' >"$WORK/list" || fail "dpkg-deb -c failed"
    sed 's/^[^ ]* //; s#^\./#/#; s#/$##' "$WORK/list" | sort >"$WORK/paths"
    local want=(
        /usr/bin/portico
        /etc/portico/portico.toml
        "$UNIT"
        /usr/share/bash-completion/completions/portico
        /usr/share/zsh/vendor-completions/_portico
        /usr/share/fish/vendor_completions.d/portico.fish
        /usr/share/man/man1/portico.1.gz
        /usr/share/man/man1/portico-run.1.gz
        /usr/share/man/man1/portico-check.1.gz
        /usr/share/man/man1/portico-import.1.gz
        /usr/share/doc/portico/README.md
        /usr/share/doc/portico/copyright
        /usr/share/doc/portico/changelog.Debian.gz
        /usr/share/doc/portico/grafana/portico.json
    )
    local f
    for f in config/*.toml; do want+=("/usr/share/doc/portico/examples/${f#config/}"); done
    for f in "${want[@]}"; do
        grep -qxF "$f" "$WORK/paths" || fail "$f is not in the package"
    done
    # Nothing else but the directories leading to them.
    local extra
    extra=$(grep -v -x -F -f <(printf '%s\n' "${want[@]}") "$WORK/paths" |
        while read -r p; do printf '%s\n' "${want[@]}" | grep -q "^$p/" || echo "$p"; done)
    [[ -z $extra ]] || fail "unexpected files in the package: $extra"
    grep -qxF -- "-rwxr-xr-x /usr/bin/portico" <(sed 's# \./# /#' "$WORK/list") ||
        fail "/usr/bin/portico is not -rwxr-xr-x: $(grep ' ./usr/bin/portico$' "$WORK/list")"
    cat "$WORK/paths"
}
check "files: binary, unit, conffile, completions (bash, zsh, fish), man pages, docs, examples, dashboard; nothing else" check_files

check_control_files() {
    mkdir -p "$WORK/control" "$WORK/data"
    dpkg-deb -e "$DEB" "$WORK/control" || fail "dpkg-deb -e failed"
    dpkg-deb -x "$DEB" "$WORK/data" || fail "dpkg-deb -x failed"
    [[ $(cat "$WORK/control/conffiles") == /etc/portico/portico.toml ]] ||
        fail "conffiles: $(cat "$WORK/control/conffiles")"
    local postinst=$WORK/control/postinst
    grep -q 'daemon-reload' "$postinst" || fail "postinst: no daemon-reload"
    grep -q 'deb-systemd-invoke try-restart portico.service' "$postinst" ||
        fail "postinst: no try-restart on upgrade (restart only if running)"
    if grep -Eq 'deb-systemd-invoke (start|restart) |_dh_action=start' "$postinst"; then
        fail "postinst starts the service: $(grep -E 'deb-systemd-invoke|_dh_action' "$postinst")"
    fi
    grep -q 'was-enabled' "$postinst" || fail "postinst: enable is not conditional on was-enabled"
    grep -q 'rm -rf /var/lib/portico' "$WORK/control/postrm" || fail "postrm: purge keeps /var/lib/portico"
    cmp "$WORK/data$UNIT" systemd/portico.service || fail "the packaged unit differs from systemd/portico.service"
    grep -q '^ExecStart=/usr/bin/portico run -c /etc/portico/portico.toml$' "$WORK/data$UNIT" ||
        fail "the unit does not run /usr/bin/portico with /etc/portico/portico.toml"
    cmp "$WORK/data/etc/portico/portico.toml" debian/portico.toml || fail "the conffile differs from debian/portico.toml"
    # debug = 1 in the release profile (and package-test, which inherits it): the symbols must have gone to the -dbgsym package.
    if readelf -S "$WORK/data/usr/bin/portico" | grep -q '\.debug_info'; then
        fail "/usr/bin/portico still has .debug_info (not stripped)"
    fi
    # The changelog's top entry must name the version being packaged.
    local top
    top=$(zcat "$WORK/data/usr/share/doc/portico/changelog.Debian.gz" | head -n1)
    [[ $top == "portico ($DEB_VERSION) "* ]] || fail "debian/changelog's top entry is '$top', the package is $DEB_VERSION: add an entry"
    zcat "$WORK/data/usr/share/man/man1/portico.1.gz" | grep -q '^\.TH portico 1' || fail "portico.1 is not a man page"
}
check "control files: conffiles, postinst (daemon-reload, try-restart, never start/enable), postrm purge; unit and conffile as in the repo; binary stripped; changelog version" check_control_files

# ------------------------------------------------------------ install

check_install() {
    dpkg -i "$DEB" || fail "dpkg -i $DEB failed"
    dpkg-query -W -f '${Status}\n' portico | grep -qx 'install ok installed' ||
        fail "status: $(dpkg-query -W -f '${Status}' portico)"
}
check "install: dpkg -i" check_install

check_version() {
    local out want=$VERSION
    out=$(/usr/bin/portico --version) || fail "/usr/bin/portico --version failed"
    echo "$out"
    if git -C "$ROOT" rev-parse --show-toplevel >/dev/null 2>&1; then
        want="$VERSION ($(git -C "$ROOT" rev-parse --short HEAD))"
    fi
    [[ $out == "portico $want" ]] || fail "portico --version: '$out', want 'portico $want'"
}
check "installed: /usr/bin/portico --version names the version and the commit" check_version

check_default_config() {
    local out
    out=$(/usr/bin/portico check -c /etc/portico/portico.toml 2>&1) || fail "portico check failed: $out"
    echo "$out"
    [[ $(head -n1 <<<"$out") == *": ok ("* ]] || fail "no ': ok (' in the first line: $out"
    grep -q '127.0.0.1:8443' <<<"$out" || fail "the default config does not listen on 127.0.0.1:8443"
    # What the unit's ExecStartPre runs: as the service's user, through /etc/portico (0750 root:portico).
    out=$(runuser -u portico -- /usr/bin/portico check -c /etc/portico/portico.toml 2>&1) ||
        fail "as user portico: $out"
}
check "installed: portico check -c /etc/portico/portico.toml passes (as root and as portico)" check_default_config

check_user() {
    local pw uid shell
    pw=$(getent passwd portico) || fail "no user portico"
    uid=$(cut -d: -f3 <<<"$pw")
    shell=$(cut -d: -f7 <<<"$pw")
    [[ $uid -lt 1000 ]] || fail "portico is not a system user (uid $uid)"
    [[ $shell == */nologin ]] || fail "portico's shell is $shell"
    [[ $(id -gn portico) == portico ]] || fail "portico's primary group is $(id -gn portico)"
    getent group certreaders >/dev/null || fail "no group certreaders (the unit's SupplementaryGroups)"
    [[ $(stat -c '%a %U %G' /etc/portico) == "750 root portico" ]] ||
        fail "/etc/portico is $(stat -c '%a %U %G' /etc/portico), want 750 root portico"
    # Not enabled, not started by the install.
    [[ ! -e /etc/systemd/system/multi-user.target.wants/portico.service ]] || fail "the unit was enabled"
    local p
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/exe" 2>/dev/null) != /usr/bin/portico ]] || fail "/usr/bin/portico is running (pid ${p#/proc/})"
    done
    echo "$pw"
}
check "installed: system user and group portico, group certreaders, /etc/portico 0750 root:portico, unit neither enabled nor started" check_user

check_unit() {
    local out code exposure
    out=$(systemd-analyze verify "$UNIT" 2>&1)
    code=$?
    echo "$out"
    [[ $code -eq 0 ]] || fail "systemd-analyze verify $UNIT: exit $code"
    ! grep -q 'portico.service' <<<"$out" || fail "systemd-analyze verify: $(grep portico.service <<<"$out" | head -n1)"
    out=$(systemd-analyze security --offline=true "$UNIT" 2>&1)
    exposure=$(sed -n 's/.*Overall exposure level for portico.service: \([0-9.]*\).*/\1/p' <<<"$out")
    [[ -n $exposure ]] || fail "no exposure level in: $(tail -n3 <<<"$out")"
    echo "# exposure $exposure"
    awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "overall exposure $exposure > 2.0"
}
check "installed: systemd-analyze verify passes on $UNIT, security exposure <= 2.0" check_unit

check_completions_and_man() {
    [[ -s /usr/share/bash-completion/completions/portico ]] || fail "no bash completion"
    grep -q 'check' /usr/share/bash-completion/completions/portico || fail "bash completion lacks 'check'"
    grep -q 'check' /usr/share/zsh/vendor-completions/_portico || fail "zsh completion lacks 'check'"
    grep -q 'check' /usr/share/fish/vendor_completions.d/portico.fish || fail "fish completion lacks 'check'"
    if command -v bash >/dev/null; then
        bash -c 'source /usr/share/bash-completion/completions/portico && complete -p portico' ||
            fail "the bash completion does not register for portico"
    fi
    zcat /usr/share/man/man1/portico-check.1.gz | grep -qF -- '\-\-config' || fail "portico-check.1 lacks --config"
    zcat /usr/share/man/man1/portico-import.1.gz | grep -qF -- '\-\-xray' || fail "portico-import.1 lacks --xray"
    grep -q 'import' /usr/share/bash-completion/completions/portico || fail "bash completion lacks 'import'"
}
check "installed: completions load (bash) and name the subcommands; man pages" check_completions_and_man

# ------------------------------------------------------------ upgrade

check_upgrade() {
    printf '\n# edited by the administrator\n' >>/etc/portico/portico.toml
    cp /etc/portico/portico.toml "$WORK/edited.toml"
    dpkg -i "$UPGRADE_DEB" </dev/null || fail "dpkg -i $UPGRADE_DEB (upgrade) failed"
    [[ $(dpkg-query -W -f '${Version}' portico) == "$UPGRADE_VERSION" ]] ||
        fail "installed version after upgrade: $(dpkg-query -W -f '${Version}' portico)"
    cmp /etc/portico/portico.toml "$WORK/edited.toml" || fail "the upgrade replaced the edited conffile"
    [[ $(stat -c '%a %U %G' /etc/portico) == "750 root portico" ]] ||
        fail "after the upgrade /etc/portico is $(stat -c '%a %U %G' /etc/portico)"
    /usr/bin/portico check -c /etc/portico/portico.toml >/dev/null || fail "check after upgrade failed"
}
check "upgrade: $DEB_VERSION -> $UPGRADE_VERSION keeps the edited /etc/portico/portico.toml" check_upgrade

# ------------------------------------------------------------ lintian

check_lintian() {
    local out code
    # As root (CI) lintian warns that it should not be: it only reads the .deb.
    out=$(lintian --fail-on error --tag-display-limit 0 "$DEB" 2>&1)
    code=$?
    echo "$out" >"$WORK/lintian.out"
    [[ $code -eq 0 ]] || fail "lintian reports errors (exit $code): $(grep '^E:' <<<"$out" | head -n3 | tr '\n' ' ')"
}
check "lintian: no errors" check_lintian
# Warnings kept (see the README's packaging notes), shown on every run.
[[ ! -s $WORK/lintian.out ]] || sed 's/^/# lintian: /' "$WORK/lintian.out"

# ------------------------------------------------------------ purge

check_purge() {
    # State the service wrote, and a certificate the user put in /etc/portico.
    mkdir -p /var/lib/portico/acme && echo state >/var/lib/portico/acme/account.json
    echo "user cert" >/etc/portico/user-provided.pem
    dpkg --purge portico || fail "dpkg --purge portico failed"
    dpkg-query -W -f '${Status}' portico 2>/dev/null | grep -q 'install ok' && fail "portico is still installed"
    local gone
    for gone in /usr/bin/portico "$UNIT" /etc/portico/portico.toml /var/lib/portico \
        /usr/share/doc/portico /usr/share/man/man1/portico.1.gz \
        /usr/share/bash-completion/completions/portico; do
        [[ ! -e $gone ]] || fail "$gone is still there after purge"
    done
    [[ $(cat /etc/portico/user-provided.pem 2>&1) == "user cert" ]] ||
        fail "purge removed the certificate the user put in /etc/portico"
    ! dpkg-statoverride --list /etc/portico >/dev/null || fail "the statoverride on /etc/portico is still there"
}
check "purge: binary, unit, conffile, docs and /var/lib/portico gone; a user's certificate in /etc/portico kept" check_purge

finish
