#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the sources vendored in the llama-cpp-python sdist on PyPI (the one place
# here that llama.cpp's sources come from), for the --llama-server PATH of benchmarks/serve.py and soak.py.
#   bash benchmarks/build-llama-server.sh [DIR]     # default DIR: build/llama.cpp; prints the binary's path
# About 6 minutes on 2 cores; needs cmake and a C++ compiler.
set -euo pipefail
dir="${1:-build/llama.cpp}"
version=0.3.36
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$dir"
if [ ! -d "$dir/llama_cpp_python-$version" ]; then
    "$py" -m pip download --disable-pip-version-check -q "llama-cpp-python==$version" --no-binary :all: --no-deps \
        -d "$dir"
    tar xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
fi
src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$src/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DCMAKE_BUILD_TYPE=Release > "$dir/cmake.log"
cmake --build "$src/build" --target llama-server -j "$(nproc)" > "$dir/build.log"
realpath "$src/build/bin/llama-server"
