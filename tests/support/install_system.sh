#!/usr/bin/env bash
# Install the system programs the test suite runs (Debian/Ubuntu packages), say what is missing.
#
#   tests/support/install_system.sh COMMAND:PACKAGE...
#
# Each COMMAND missing from PATH is installed from its Debian/Ubuntu PACKAGE with apt-get
# (through sudo when not root). What still cannot be found afterwards is named, with the
# package to install; the tests that need it are then skipped, except under CI=true, where
# this script fails (CI must never go green without running a part of the suite).
# redis-server must be version 7 or newer.
set -uo pipefail

ci=false
case "${CI:-}" in 1 | true | TRUE | True | yes) ci=true ;; esac

missing_packages() {
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || echo "${pair#*:}"
  done | sort -u | tr '\n' ' '
}

packages=$(missing_packages "$@")
if [ -n "$packages" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "install-system: not root and no sudo: cannot install $packages" >&2
      fi
    fi
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
      echo "install-system: installing $packages"
      # shellcheck disable=SC2086 # one word per package
      $sudo apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null ||
        echo "install-system: apt-get could not install $packages" >&2
    fi
  else
    echo "install-system: no apt-get on this system" >&2
  fi
fi

problems=()
for pair in "$@"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 ||
    problems+=("${pair%%:*} is missing (Debian/Ubuntu package ${pair#*:})")
done
if command -v redis-server >/dev/null 2>&1; then
  version=$(redis-server --version | sed -n 's/.* v=\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p')
  if [ "${version%%.*}" -lt 7 ] 2>/dev/null || [ -z "$version" ]; then
    problems+=("redis-server ${version:-of unknown version} is too old: the tests need Redis 7 or newer")
  fi
fi

if [ ${#problems[@]} -gt 0 ]; then
  for problem in "${problems[@]}"; do echo "install-system: $problem" >&2; done
  if $ci; then
    echo "install-system: CI=true, so a missing program fails the run" >&2
    exit 1
  fi
  echo "install-system: the tests that need these are skipped (CI=true fails instead)" >&2
fi
exit 0
