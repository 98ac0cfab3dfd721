#!/usr/bin/env bash
# download.sh - download the Llama 2 weights with the signed URL that Meta e-mails you.
#
# Every file is downloaded to FILE.part (resumable with wget --continue), checked
# against the md5 checklist that comes with it, and only then renamed to FILE, so a
# file with its final name is always complete and verified. Run it again after any
# failure: verified files are skipped and partial downloads are resumed.
#
# Portable to the bash 3.2 that ships with macOS: no associative arrays, no ${var,,}.

if [ -z "${BASH_VERSION:-}" ]; then
    echo "download.sh: error: run this script with bash: bash download.sh (or ./download.sh)" >&2
    exit 2
fi
set -euo pipefail

readonly NEW_LINK_PAGE="https://llama.meta.com/llama-downloads/"
readonly VALID_MODELS="7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat"
PROG=${0##*/}

# Exit statuses (also listed in --help).
readonly EXIT_FAILED=1 EXIT_USAGE=2 EXIT_PREREQ=3 EXIT_LINK=4 EXIT_CHECKSUM=5

usage() {
    cat <<EOF
Usage: $PROG [--url URL] [--models LIST] [--target-dir DIR] [--tries N]

Download the Llama 2 weights with the signed URL that Meta e-mailed you
(it looks like https://download.llamameta.net/*?Policy=...&Signature=...).

Without --url or --models the script asks for them: first the URL, then the
comma-separated list of models (press Enter for all of them).

Options:
  --url URL         the signed URL from the e-mail; quote it for the shell,
                    e.g. --url 'https://download.llamameta.net/*?Policy=...'
  --models LIST     comma-separated models, case-insensitive, or "all":
                    $VALID_MODELS
  --target-dir DIR  folder to download into (created if missing; default: .)
  --tries N         attempts per file before giving up (default: 20); wget
                    resumes an interrupted transfer on each new attempt
  -h, --help        show this help and exit

Environment variables (a flag wins over its variable):
  LLAMA_DOWNLOAD_URL    same as --url
  LLAMA_MODELS          same as --models
  LLAMA_TARGET_DIR      same as --target-dir
  LLAMA_DOWNLOAD_TRIES  same as --tries

Layout written in the target folder:
  LICENSE, USE_POLICY.md, tokenizer.model, tokenizer_checklist.chk
  llama-2-7b/ (consolidated.00.pth, params.json, checklist.chk), llama-2-13b/
  (2 shards), llama-2-70b/ (8 shards), and the same for the -chat models.

Files are downloaded to FILE.part, verified against the md5 checklists and only
then renamed. Run the script again after an interruption: verified files are
skipped and partial downloads resume where they stopped.

The link is valid for 24 hours and a limited number of downloads. If the server
refuses it (HTTP 403), request a new one at $NEW_LINK_PAGE

Requires wget, and md5sum (Linux) or md5 (macOS).

Exit status: 0 success, 1 download failed, 2 usage error, 3 missing prerequisite,
             4 link expired or invalid (HTTP 403), 5 checksum mismatch.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    local code=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

# trim STRING: print STRING without leading/trailing whitespace and carriage returns.
trim() {
    local s=$1
    s=${s//$'\r'/}
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

# ---------------------------------------------------------------- arguments

url=${LLAMA_DOWNLOAD_URL-}
models_arg=${LLAMA_MODELS-}
target_dir=${LLAMA_TARGET_DIR:-.}
tries=${LLAMA_DOWNLOAD_TRIES:-20}

need_value() {
    [ "$2" -ge 2 ] || die "$EXIT_USAGE" "$1 needs a value (see --help)"
}

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --url)
            need_value "$1" $#
            url=$2
            shift 2
            ;;
        --url=*)
            url=${1#--url=}
            shift
            ;;
        --models)
            need_value "$1" $#
            models_arg=$2
            shift 2
            ;;
        --models=*)
            models_arg=${1#--models=}
            shift
            ;;
        --target-dir)
            need_value "$1" $#
            target_dir=$2
            shift 2
            ;;
        --target-dir=*)
            target_dir=${1#--target-dir=}
            shift
            ;;
        --tries)
            need_value "$1" $#
            tries=$2
            shift 2
            ;;
        --tries=*)
            tries=${1#--tries=}
            shift
            ;;
        *)
            die "$EXIT_USAGE" "unknown argument '$1' (see --help)"
            ;;
    esac
done

case $tries in
    '' | *[!0-9]* | 0) die "$EXIT_USAGE" "--tries must be a positive whole number, not '$tries'" ;;
esac
[ -n "$target_dir" ] || die "$EXIT_USAGE" "the target folder must not be empty"

# ------------------------------------------------------------ prerequisites

missing=0
if ! command -v wget >/dev/null 2>&1; then
    printf '%s: error: %s\n' "$PROG" "wget is required but was not found in PATH. Install it, e.g.
  sudo apt-get install wget   (Debian, Ubuntu)
  sudo dnf install wget       (Fedora, RHEL)
  brew install wget           (macOS, with Homebrew)" >&2
    missing=1
fi
md5_tool=
if command -v md5sum >/dev/null 2>&1; then
    md5_tool=md5sum
elif command -v md5 >/dev/null 2>&1; then
    md5_tool=md5
else
    printf '%s: error: %s\n' "$PROG" "md5sum (GNU coreutils, Linux) or md5 (macOS) is required to verify the downloads, but neither was found in PATH." >&2
    missing=1
fi
for tool in awk grep mkdir mktemp mv rm tee tr; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        printf '%s: error: %s\n' "$PROG" "the standard tool '$tool' was not found in PATH." >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit "$EXIT_PREREQ"

# ------------------------------------------------------------- URL and models

if [ -z "$url" ]; then
    if ! read -r -p "Enter the URL from email: " url && [ -z "$url" ]; then
        die "$EXIT_USAGE" "no download URL given: paste it when asked, or pass --url or set LLAMA_DOWNLOAD_URL"
    fi
fi
url=$(trim "$url")
[ -n "$url" ] || die "$EXIT_USAGE" "no download URL given: paste it when asked, or pass --url or set LLAMA_DOWNLOAD_URL"

case $url in
    http://* | https://*) ;;
    *) die "$EXIT_USAGE" "the URL must start with https:// - paste it exactly as it appears in the e-mail (without quotes or angle brackets)" ;;
esac
case $url in
    *'*'*) ;;
    *) die "$EXIT_USAGE" "the URL contains no '*' (it stands for each file's path). Paste the whole link from the e-mail, e.g. https://download.llamameta.net/*?Policy=..." ;;
esac
case $url in
    *[[:space:]]*) warn "the URL contains whitespace; a link broken over several lines by the e-mail client will be refused" ;;
esac

# Each file's URL is the part before the first '*', the file's path, and the rest.
# Plain prefix/suffix removal: nothing in the URL is ever interpreted.
url_prefix=${url%%\**}
url_suffix=${url#*\*}

if [ -z "$models_arg" ]; then
    if read -r -p "Enter the list of models to download without spaces ($VALID_MODELS), or press Enter for all: " models_arg; then
        [ -n "$models_arg" ] || models_arg=all
    elif [ -z "$models_arg" ]; then
        die "$EXIT_USAGE" "no model list given: answer the prompt, or pass --models or set LLAMA_MODELS (use 'all' for every model)"
    fi
fi

# Parse the list: case-insensitive, spaces tolerated, duplicates dropped.
models=()
seen=" "
unknown=""
rest="$(printf '%s' "$models_arg" | tr '[:upper:]' '[:lower:]'),"
while [ -n "$rest" ]; do
    item=$(trim "${rest%%,*}")
    rest=${rest#*,}
    item=${item#llama-2-}
    case $item in
        '') continue ;;
        all) expanded="7b 13b 70b 7b-chat 13b-chat 70b-chat" ;;
        7b | 13b | 70b | 7b-chat | 13b-chat | 70b-chat) expanded=$item ;;
        *)
            unknown="$unknown${unknown:+, }'$item'"
            continue
            ;;
    esac
    for m in $expanded; do
        case $seen in
            *" $m "*) ;;
            *)
                seen="$seen$m "
                models+=("$m")
                ;;
        esac
    done
done
[ -z "$unknown" ] || die "$EXIT_USAGE" "unknown model name(s): $unknown. Valid names (case-insensitive): $VALID_MODELS, or 'all'"
[ "${#models[@]}" -gt 0 ] || die "$EXIT_USAGE" "no model selected. Valid names (case-insensitive): $VALID_MODELS, or 'all'"

# ------------------------------------------------------------------ helpers

mkdir -p -- "$target_dir" || die "$EXIT_FAILED" "cannot create the target folder '$target_dir'"
CDPATH='' cd -- "$target_dir" || die "$EXIT_FAILED" "cannot enter the target folder '$target_dir'"

log=$(mktemp "${TMPDIR:-/tmp}/llama-download.XXXXXX") || die "$EXIT_FAILED" "mktemp failed"
trap 'rm -f -- "$log"' EXIT
trap 'printf "\n%s: interrupted; run the script again to resume the download\n" "$PROG" >&2; exit 130' INT TERM

if [ -t 2 ]; then
    progress=--progress=bar:force
else
    progress=--progress=dot:giga
fi

# md5_of FILE: print FILE's md5 in lower case.
md5_of() {
    local out
    if [ "$md5_tool" = md5sum ]; then
        out=$(md5sum <"$1") || return 1
        out=${out%% *}
    else
        out=$(md5 -q "$1") || return 1
    fi
    printf '%s\n' "$out" | tr '[:upper:]' '[:lower:]'
}

# expected_md5 CHECKLIST NAME: print the md5 listed for NAME ("<md5>  NAME" lines).
expected_md5() {
    awk -v want="$2" '
        { sub(/\r$/, "") }
        $1 ~ /^[0-9A-Fa-f]+$/ && length($1) == 32 {
            name = $0
            sub(/^[ \t]*[^ \t]+[ \t]+/, "", name)
            sub(/^\*/, "", name)
            sub(/^\.\//, "", name)
            if (name == want) { print tolower($1); exit }
        }' "$1"
}

# fetch REL: download REL (a path relative to the target folder) into REL.part,
# continuing whatever REL.part already holds. Exits on any failure.
fetch() {
    local rel=$1 part="$1.part" rc
    say "Downloading $rel"
    set +e
    LC_ALL=C wget --continue --tries="$tries" "$progress" -O "$part" -- "$url_prefix$rel$url_suffix" 2>&1 | tee "$log" >&2
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] && return 0
    # wget leaves an empty output file behind when the server refuses the request.
    [ -s "$part" ] || rm -f -- "$part"
    case $rc in
        8)
            if grep -q -E 'ERROR 403|awaiting response\.\.\. 403' "$log"; then
                die "$EXIT_LINK" "the server refused $rel (HTTP 403 Forbidden).
The download link has expired or was mangled when it was copied:
  - a link is valid for 24 hours and for a limited number of downloads;
  - e-mail clients and terminals can break a long link or alter characters in it.
Request a new link at $NEW_LINK_PAGE and paste it exactly as received
(quote it in single quotes when passing it with --url). Files already verified
are kept; run the script again with the new link to continue."
            fi
            die "$EXIT_FAILED" "the server answered $rel with an error (see wget's message above). Check that the link is for Llama 2 and that you requested this model."
            ;;
        3) die "$EXIT_FAILED" "could not write $part (is the disk full?). Free some space and run the script again to resume." ;;
        4) die "$EXIT_FAILED" "network failure while downloading $rel. Run the script again to resume where it stopped." ;;
        5) die "$EXIT_FAILED" "SSL verification failed while downloading $rel." ;;
        *) die "$EXIT_FAILED" "wget failed (exit status $rc) while downloading $rel. Run the script again to resume." ;;
    esac
}

# get_plain REL: download a file that has no checksum unless it is already there.
get_plain() {
    local rel=$1
    if [ -s "$rel" ]; then
        say "$rel: already present, skipping"
        return 0
    fi
    fetch "$rel"
    mv -f -- "$rel.part" "$rel"
}

# get_verified REL CHECKLIST: download REL and check it against its md5 in CHECKLIST
# (where it is listed by its name relative to the checklist's folder).
get_verified() {
    local rel=$1 checklist=$2 want got resumed=0
    want=$(expected_md5 "$checklist" "${rel##*/}") || die "$EXIT_FAILED" "cannot read $checklist"
    if [ -z "$want" ]; then
        rm -f -- "$checklist"
        die "$EXIT_CHECKSUM" "$checklist lists no md5 for ${rel##*/}; the checklist was deleted, run the script again to download it anew."
    fi
    if [ -f "$rel" ]; then
        got=$(md5_of "$rel") || die "$EXIT_FAILED" "cannot read $rel"
        if [ "$got" = "$want" ]; then
            say "$rel: already downloaded and verified, skipping"
            return 0
        fi
        # Perhaps an interrupted download from another script: try to resume it.
        warn "$rel does not match its checksum; resuming it as $rel.part"
        mv -f -- "$rel" "$rel.part"
    fi
    [ -s "$rel.part" ] && resumed=1
    fetch "$rel"
    got=$(md5_of "$rel.part") || die "$EXIT_FAILED" "cannot read $rel.part"
    if [ "$got" != "$want" ] && [ "$resumed" -eq 1 ]; then
        warn "$rel: checksum mismatch after resuming an earlier partial download; downloading it again from scratch"
        rm -f -- "$rel.part"
        fetch "$rel"
        got=$(md5_of "$rel.part") || die "$EXIT_FAILED" "cannot read $rel.part"
    fi
    if [ "$got" != "$want" ]; then
        rm -f -- "$rel.part"
        die "$EXIT_CHECKSUM" "checksum mismatch for $rel: expected md5 $want (from $checklist), got $got. The damaged download was deleted; run the script again to download it anew."
    fi
    mv -f -- "$rel.part" "$rel"
    say "$rel: OK (md5 verified)"
}

# ----------------------------------------------------------------- download

say "Downloading into $(pwd)"

get_plain LICENSE
get_plain USE_POLICY.md
get_plain tokenizer_checklist.chk
get_verified tokenizer.model tokenizer_checklist.chk

for m in "${models[@]}"; do
    dir="llama-2-$m"
    case $m in
        7b*) shards=1 ;;
        13b*) shards=2 ;;
        70b*) shards=8 ;;
    esac
    say "== Model $dir ($shards shard(s))"
    mkdir -p -- "$dir" || die "$EXIT_FAILED" "cannot create the folder $dir"
    get_plain "$dir/checklist.chk"
    s=0
    while [ "$s" -lt "$shards" ]; do
        get_verified "$dir/consolidated.0$s.pth" "$dir/checklist.chk"
        s=$((s + 1))
    done
    get_verified "$dir/params.json" "$dir/checklist.chk"
done

say "All done: ${#models[@]} model(s) downloaded and verified in $(pwd)"
