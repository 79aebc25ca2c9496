# shellcheck shell=bash
# Shared helpers for scripts/*: installing the test tools, SoftHSM token
# directories, pkcs11-ha config files and slot-ID arithmetic.
# Source it; it defines functions and variables only (no side effects).

# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOFTHSM_LIB="/usr/lib/softhsm/libsofthsm2.so"
# This machine's multiarch library directory, /usr/lib/<triplet>.
multiarch_lib_dir() {
    local triplet
    triplet="$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)"
    printf '/usr/lib/%s\n' "${triplet:-$(uname -m)-linux-gnu}"
}

# p11-kit's module directory: its pkg-config file says, else the multiarch
# one.
p11kit_module_dir() {
    local dir
    dir="$(pkg-config --variable=p11_module_path p11-kit-1 2>/dev/null)"
    printf '%s\n' "${dir:-$(multiarch_lib_dir)/pkcs11}"
}
P11KIT_CLIENT="$(p11kit_module_dir)/p11-kit-client.so"
PKCS11_ENGINE="$(multiarch_lib_dir)/engines-3/pkcs11.so"
USER_PIN="1234"
SO_PIN="5678"

# step TEXT...: a heading a human can follow.
step() {
    if [[ -t 1 ]]; then
        printf '\n\033[1m==> %s\033[0m\n' "$*"
    else
        printf '\n==> %s\n' "$*"
    fi
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ensure_tools: install softhsm2, opensc, p11-kit (and libsofthsm2,
# p11-kit-modules, openssl) and the clients of tests/clients.rs (NSS's
# certutil and modutil, GnuTLS's p11tool and certtool, OpenSSL's pkcs11
# engine, Java 17 for SunPKCS11) with apt-get when something is missing.
ensure_tools() {
    local missing=() need
    # "file-or-command:package"
    for need in softhsm2-util:softhsm2 "$SOFTHSM_LIB":libsofthsm2 \
        pkcs11-tool:opensc p11-kit:p11-kit "$P11KIT_CLIENT":p11-kit-modules \
        openssl:openssl certutil:libnss3-tools modutil:libnss3-tools \
        p11tool:gnutls-bin certtool:gnutls-bin \
        "$PKCS11_ENGINE":libengine-pkcs11-openssl \
        java:openjdk-17-jdk-headless javac:openjdk-17-jdk-headless setpriv:util-linux; do
        local what="${need%%:*}" pkg="${need##*:}"
        if [[ "$what" == /* ]]; then
            [[ -e "$what" ]] && continue
        else
            command -v "$what" >/dev/null 2>&1 && continue
        fi
        [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ "$(id -u)" != 0 ]]; then
        die "missing tools; as root run: apt-get update && apt-get install -y ${missing[*]}"
    fi
    step "Installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# softhsm_setup DIR: make DIR/tokens and DIR/softhsm2.conf; prints the conf path.
softhsm_setup() {
    local dir="$1"
    mkdir -p "$dir/tokens"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
        "$dir/tokens" >"$dir/softhsm2.conf"
    printf '%s\n' "$dir/softhsm2.conf"
}

# softhsm_init_token CONF LABEL [SO_PIN USER_PIN]: a new token, by default
# with $SO_PIN / $USER_PIN.
softhsm_init_token() {
    SOFTHSM2_CONF="$1" softhsm2-util --init-token --free --label "$2" \
        --so-pin "${3:-$SO_PIN}" --pin "${4:-$USER_PIN}" >/dev/null
}

# softhsm_token_field CONF LABEL FIELD: FIELD is "serial" or "slot".
softhsm_token_field() {
    SOFTHSM2_CONF="$1" softhsm2-util --show-slots | awk -v want="$2" -v field="$3" '
        /^Slot [0-9]+/      { slot = $2; serial = "" }
        /Serial number:/    { sub(/.*Serial number:[ \t]*/, ""); sub(/[ \t]+$/, ""); serial = $0 }
        /^[ \t]+Label:/     { sub(/.*Label:[ \t]*/, ""); sub(/[ \t]+$/, "")
                              if ($0 == want && serial != "") {
                                  print (field == "serial" ? serial : slot); found = 1; exit
                              } }
        END                 { exit found ? 0 : 1 }'
}

softhsm_serial() { softhsm_token_field "$1" "$2" serial; }
softhsm_slot() { softhsm_token_field "$1" "$2" slot; }

# passthrough_slot_id LIBRARY_NAME MEMBER_SLOT_ID: the slot ID pkcs11-ha
# gives that member slot, FNV-1a (32 bits) of "<name, lower case>/<slot>"
# brought into [0x1000, 2^31) (src/slot_ids.rs; slots whose hashes collide,
# which takes thousands of slots to be likely, get the next free ID there).
passthrough_slot_id() {
    local key hash=2166136261 i
    key="$(printf '%s/%s' "${1,,}" "$2")"
    for ((i = 0; i < ${#key}; i++)); do
        hash=$(((hash ^ $(printf '%d' "'${key:i:1}")) * 16777619 & 0xffffffff))
    done
    echo $((0x1000 + hash % ((1 << 31) - 0x1000)))
}

# write_ha_config FILE GROUP_LABEL MEMBER_SERIAL...: one softhsm library and
# one group (slot 0) of the given members, primary first. With only FILE,
# a config without groups (pass-through slots only).
write_ha_config() {
    local file="$1"
    shift
    {
        printf '[Libraries]\nsofthsm = %s\n\n[VirtualToken]\n' "$SOFTHSM_LIB"
        if (($# > 0)); then
            local label="$1"
            shift
            local IFS=,
            printf 'VirtualToken00Label = %s\nVirtualToken00Members = %s\n' "$label" "$*"
        fi
        printf '\n[HAConfiguration]\nHAOnly = 0\n'
    } >"$file"
}
