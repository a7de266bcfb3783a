#!/usr/bin/env bash
# Make Fashion-MNIST available for the demo backbone: it is found in /usr/share/datasets/fashion-mnist
# (Debian package dataset-fashion-mnist). Install the package when it is missing and apt is usable;
# otherwise say what to do instead (robustprompt can also download it: --download).
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if [ "$sudo" != "none" ]; then
    echo "installing Debian package dataset-fashion-mnist (Fashion-MNIST for the demo backbone)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
      { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
  fi
fi
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
echo "warning: Fashion-MNIST is not in $dir and could not be installed with apt." >&2
echo "  Install it with 'apt-get install dataset-fashion-mnist', or let robustprompt download it:" >&2
echo "  robustprompt pretrain-demo --download" >&2
exit 0
