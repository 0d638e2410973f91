#!/usr/bin/env bash
# Install the Debian CJK font packages the glyph dataset renders (python -m workers.data.glyphs).
#
#   bash workers/data/install_fonts.sh          # the full set, for the real (>= 10,000 identity) build
#   bash workers/data/install_fonts.sh --ci     # the small set the tests render
#   bash workers/data/install_fonts.sh [--ci] --list   # print the set's packages, install nothing
#
# Packages already installed are skipped; with nothing missing the script does nothing and says
# nothing (tests/run.sh calls it on every run). Installing needs apt-get, so run it as root.
# Licences: /usr/share/doc/<package>/copyright, summarised in the README ("Glyph dataset").
set -euo pipefail

# 34 MB to download, 86 MiB installed (Debian 12): Arphic UKai and UMing, WenQuanYi Zen Hei and
# Micro Hei, IPA Gothic and Mincho
CI_PACKAGES=(fonts-arphic-ukai fonts-arphic-uming fonts-wqy-zenhei fonts-wqy-microhei
             fonts-ipafont-gothic fonts-ipafont-mincho)
# plus Noto Sans CJK and Noto Serif CJK in 7 weights each: 224 MB to download, 384 MiB installed
FULL_PACKAGES=("${CI_PACKAGES[@]}" fonts-noto-cjk fonts-noto-cjk-extra)

packages=("${FULL_PACKAGES[@]}")
list=false
for argument in "$@"; do
    case "$argument" in
        --ci) packages=("${CI_PACKAGES[@]}") ;;
        --list) list=true ;;
        *) echo "error: unknown argument '$argument'; usage: install_fonts.sh [--ci] [--list]" >&2
           exit 2 ;;
    esac
done
if $list; then
    printf '%s\n' "${packages[@]}"
    exit 0
fi

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "error: install_fonts.sh: ${missing[*]} missing; installing them needs root (apt-get)" >&2
    exit 1
fi
echo "install_fonts.sh: installing ${missing[*]}" >&2
start=$(date +%s)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
echo "install_fonts.sh: installed ${#missing[@]} packages in $(( $(date +%s) - start )) s" >&2
