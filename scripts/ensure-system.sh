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
# IC card readers: pcscd, and the vpcd virtual reader the IC tests insert their emulated cards into.
[ -x /usr/sbin/pcscd ] || missing+=(pcscd)
[ -e /etc/reader.conf.d/vpcd ] || missing+=(vsmartcard-vpcd)
# pyscard has no Linux wheel: it compiles against the PC/SC headers and the Python headers.
[ -e /usr/include/PCSC/winscard.h ] || missing+=(libpcsclite-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
# python-evdev compiles against the kernel's input headers.
[ -e /usr/include/linux/input.h ] || missing+=(linux-libc-dev)
# MQTT: the tests and the demo start private Mosquitto brokers.
[ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# Head office's production database; the tests create a fresh database on the local server.
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
# The member-centre dashboard test renders head office's charts in a real headless browser.
[ -x /usr/bin/chromium ] || missing+=(chromium)
if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
    missing+=(python3-dev)
fi

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
