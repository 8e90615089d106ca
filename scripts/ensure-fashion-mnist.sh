#!/usr/bin/env bash
# Makes sure Fashion-MNIST (Debian's dataset-fashion-mnist) is installed: the vision tests evaluate the
# shipped weights on its 10,000 test images and `make train-vision` trains on it. Installs the package with
# apt-get when running as root, else says how and fails.
set -uo pipefail

dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [[ -f $dir/t10k-images-idx3-ubyte.gz ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not installed; installing Debian's dataset-fashion-mnist with apt-get"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null ||
     { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; }; then
    exit 0
  fi
fi
echo "missing: Fashion-MNIST in $dir (apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)" >&2
exit 1
