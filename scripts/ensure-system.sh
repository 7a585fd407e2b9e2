#!/usr/bin/env bash
# Install the Debian packages the project needs when they are missing.
# Idempotent and quiet when everything is there; needs root (or sudo) otherwise.
set -euo pipefail

missing=()
# A Python with venv and pip (Debian splits them out of python3).
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv python3-pip)
fi
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# The POS API docs' curl examples are run by the tests.
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "installing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
