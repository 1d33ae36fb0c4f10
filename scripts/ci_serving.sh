#!/usr/bin/env bash
# The serving round trip (issue 16): build llama.cpp from the llama-cpp-python source distribution on PyPI
# (CPU, only the `llama` library target), then run the opt-in tests `pytest -m serving`: a FIM adapter and
# its exports converted by llama.cpp's own scripts and run through the Python binding, against PEFT.
#
# The build is cached under ${FIMLORA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/fimlora}/llama-cpp-python/,
# keyed by the pinned version and the CMake flags, so only the first run compiles (a few minutes on 2
# idle cores). Nothing is installed into .venv but the conversion scripts' and the binding's small
# dependencies; the binding itself is used from the cache through PYTHONPATH and LLAMA_CPP_LIB_PATH.
#
# Environment: FIMLORA_BUILD_JOBS (default 2) parallel compile jobs; OMP_NUM_THREADS (default 1) threads
# for torch and llama.cpp in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VERSION=0.3.36  # llama-cpp-python; its sdist vendors llama.cpp with convert_{hf,lora}_to_gguf.py
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
  -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  # relocatable: the libraries find each other next to themselves, so the finished build can be moved
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
)
CACHE="${FIMLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fimlora}/llama-cpp-python"
KEY="$(printf '%s\n' "$VERSION" "${CMAKE_FLAGS[@]}" "$(uname -m)" | sha256sum | cut -c1-12)"
PREFIX="$CACHE/$VERSION-cpu-$KEY"
SRC="$PREFIX/llama_cpp_python-$VERSION"

echo "-- dependencies of llama.cpp's conversion scripts and of the binding"
"$PY" -m pip install --quiet "sentencepiece>=0.1.98,<0.3.0" "diskcache>=5.6.1" "jinja2>=2.11.3" \
  "typing-extensions>=4.5.0"

if [ -f "$PREFIX/READY" ]; then
  echo "-- llama.cpp: cached build $PREFIX"
else
  start=$(date +%s)
  mkdir -p "$CACHE/sdist"
  SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    echo "-- downloading the llama-cpp-python $VERSION sdist"
    "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
  fi
  STAGE="$(mktemp -d "$CACHE/.build-XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  tar -xzf "$SDIST" -C "$STAGE"
  echo "-- building llama.cpp (target llama, CPU, -j${FIMLORA_BUILD_JOBS:-2}); log in $STAGE/build.log"
  if ! { cmake -S "$STAGE/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$STAGE/build" "${CMAKE_FLAGS[@]}" &&
    cmake --build "$STAGE/build" --target llama -j "${FIMLORA_BUILD_JOBS:-2}"; } >"$STAGE/build.log" 2>&1; then
    tail -40 "$STAGE/build.log"
    echo "llama.cpp build failed" >&2
    exit 1
  fi
  mkdir -p "$STAGE/lib"
  cp -P "$STAGE/build/bin/"lib*.so* "$STAGE/lib/"
  rm -rf "$STAGE/build"
  printf 'llama-cpp-python %s\nbuilt in %ss\n%s\n' "$VERSION" "$(($(date +%s) - start))" "${CMAKE_FLAGS[*]}" \
    >"$STAGE/READY"
  rm -rf "$PREFIX"
  mv "$STAGE" "$PREFIX"
  trap - EXIT
  echo "-- llama.cpp built in $(($(date +%s) - start)) s, cached in $PREFIX"
fi

export FIMLORA_LLAMA_CPP_DIR="$SRC/vendor/llama.cpp"
export LLAMA_CPP_LIB_PATH="$PREFIX/lib"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -c "import llama_cpp; print('-- llama-cpp-python', llama_cpp.__version__, 'from', llama_cpp.__file__)"
"$PY" -m pytest -m serving -q "$@"
