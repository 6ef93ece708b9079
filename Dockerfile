# syntax=docker/dockerfile:1.6
#
# Strata server images (BuildKit; Docker >= 23 uses it by default).
#
#   docker build -t strata:cpu .                                            # CPU, Debian 12
#   docker build -t strata:cuda --build-arg VARIANT=cuda .                  # CUDA, Ubuntu 24.04
#   docker build -t strata:cuda --build-arg VARIANT=cuda \
#       --build-arg LIBTORCH_URL=https://download.pytorch.org/libtorch/cu126/libtorch-cxx11-abi-shared-with-deps-2.6.0%2Bcu126.zip \
#       --build-arg LIBTORCH_SHA256=<sha256 of that zip> .
#
#   docker run --rm -p 50051:50051 -p 8000:8000 -p 9464:9464 -v strata-state:/var/lib/strata strata:cpu
#   docker run --rm --gpus all -p 50051:50051 -p 8000:8000 -p 9464:9464 -v strata-state:/var/lib/strata \
#       -v /srv/models:/models:ro -e STRATA_MODEL=/models/<dir> strata:cuda
#
# The image runs strata-server as user 10001 with its flags' environment twins set to
# STRATA_HOST=0.0.0.0 and STRATA_STATE_DIR=/var/lib/strata (a VOLUME); any other flag is an
# STRATA_* variable or an argument (`docker run ... strata:cpu --log_format=json`).
# See docs/deploy.md for the assumptions behind the CUDA variant.

# cpu | cuda: which runtime stage the final image is built on.
ARG VARIANT=cpu
ARG DEBIAN_IMAGE=debian:bookworm-slim
# The CUDA variant builds and runs on Ubuntu 24.04, whose gRPC 1.51 / protobuf 3.21 / Abseil
# 20220623 / CMake 3.28 match Debian 12's (Ubuntu 22.04 has CMake 3.22 < the 3.25 we need and
# gRPC 1.30). The CUDA version of these images must match the LibTorch build (cu126 here).
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

############################################################################ CPU build (Debian 12)
FROM ${DEBIAN_IMAGE} AS build-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# The same packages as a developer machine (setup.sh is idempotent); its own layer so that source
# changes do not reinstall them.
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh --deps
COPY . .
ARG GIT_COMMIT=unknown
ARG STRATA_JOBS=
ENV CCACHE_DIR=/ccache \
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
RUN --mount=type=cache,target=/ccache \
    cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTRATA_BUILD_TESTS=OFF \
          -DSTRATA_GIT_COMMIT="${GIT_COMMIT}" \
 && cmake --build /build --target strata-server strata -j "${STRATA_JOBS:-$(nproc)}" \
 && mkdir -p /out \
 && cp /build/server/strata-server /build/client/strata /build/client/strata-offline /out/

################################################################ CUDA build (Ubuntu 24.04 + LibTorch)
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# scripts/setup.sh's packages minus libtorch-dev (the official LibTorch replaces it), the test
# libraries (tests are off here), OpenBLAS (LibTorch bundles MKL) and the developer tools
# (prometheus, gnuplot-nox) and libgloo-dev (the official LibTorch bundles its own Gloo: data parallelism
# is off in this image, -DSTRATA_DATA_PARALLEL=ON needs matching headers); plus unzip and ca-certificates.
# tests/deploy/deploy_files_test.sh checks this list against setup.sh.
ARG CUDA_BUILD_PACKAGES="cmake ninja-build g++ pkg-config ccache \
    libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
    libabsl-dev libssl-dev prometheus-cpp-dev libspdlog-dev \
    nlohmann-json3-dev libcpp-httplib-dev libpcre2-dev libcli11-dev libicu-dev libjemalloc-dev \
    curl unzip ca-certificates binutils python3-yaml"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${CUDA_BUILD_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*
# An official CUDA LibTorch with the C++11 ABI (Ubuntu's gRPC/protobuf use it), "shared-with-deps"
# so that its CUDA libraries (cuBLAS, cuDNN, ...) ship in /opt/libtorch/lib.
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu126/libtorch-cxx11-abi-shared-with-deps-2.6.0%2Bcu126.zip
ARG LIBTORCH_SHA256=
RUN curl -fSL --retry 3 -o /tmp/libtorch.zip "${LIBTORCH_URL}" \
 && if [[ -n "${LIBTORCH_SHA256}" ]]; then echo "${LIBTORCH_SHA256}  /tmp/libtorch.zip" | sha256sum -c -; fi \
 && unzip -q /tmp/libtorch.zip -d /opt \
 && rm /tmp/libtorch.zip \
 && test -f /opt/libtorch/share/cmake/Torch/TorchConfig.cmake
WORKDIR /src
COPY . .
ARG GIT_COMMIT=unknown
ARG STRATA_JOBS=
# No GPU at build time: name the architectures instead of letting Torch's CMake probe for one.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV CMAKE_PREFIX_PATH=/opt/libtorch \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    CCACHE_DIR=/ccache \
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
RUN --mount=type=cache,target=/ccache \
    cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTRATA_BUILD_TESTS=OFF \
          -DCMAKE_PREFIX_PATH=/opt/libtorch -DSTRATA_GIT_COMMIT="${GIT_COMMIT}" \
 && cmake --build /build --target strata-server strata -j "${STRATA_JOBS:-$(nproc)}" \
 && mkdir -p /out \
 && cp /build/server/strata-server /build/client/strata /build/client/strata-offline /out/
# Ubuntu's package names differ from Debian's (e.g. the t64 suffixes); derive the runtime packages
# from what the binaries actually load, leaving out LibTorch's and CUDA's own libraries.
COPY deploy/docker/runtime-packages.sh /usr/local/bin/
RUN runtime-packages.sh --exclude /opt/libtorch --exclude /usr/local/cuda \
        /out/strata-server /out/strata /out/strata-offline > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt

######################################################################### CPU runtime (Debian 12)
FROM ${DEBIAN_IMAGE} AS runtime-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Runtime libraries only: the packages that provide the binaries' direct DT_NEEDED libraries (apt
# brings their dependencies) plus OpenBLAS (OpenMP), which LibTorch reaches through libblas.so.3.
# tests/deploy/deploy_files_test.sh --build-dir checks this list against a real build.
ARG CPU_RUNTIME_PACKAGES="libtorch1.13 libopenblas0-openmp libgomp1 \
    libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 \
    libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libspdlog1.10 libfmt9 \
    libpcre2-8-0 libicu72 libssl3 libjemalloc2 libcpp-httplib0.11"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${CPU_RUNTIME_PACKAGES} \
 && rm -rf /var/lib/apt/lists/* \
 && arch="$(uname -m)-linux-gnu" \
 && update-alternatives --set "libblas.so.3-${arch}" "/usr/lib/${arch}/openblas-openmp/libblas.so.3" \
 && update-alternatives --set "liblapack.so.3-${arch}" "/usr/lib/${arch}/openblas-openmp/liblapack.so.3"
COPY --from=build-cpu /out/strata-server /out/strata /out/strata-offline /usr/local/bin/
# Fail the build, not the first start, when a library is missing or BLAS is not OpenBLAS (OpenMP).
RUN if ldd /usr/local/bin/strata-server /usr/local/bin/strata /usr/local/bin/strata-offline | grep -F 'not found'; then exit 1; fi \
 && readlink -f "/usr/lib/$(uname -m)-linux-gnu/libblas.so.3" | grep -q openblas-openmp \
 && strata --help > /dev/null \
 && strata bench --help > /dev/null
ENV STRATA_DEVICE=cpu

#################################################################### CUDA runtime (Ubuntu 24.04)
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=build-cuda /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive xargs -a /tmp/runtime-packages.txt \
        apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt
COPY --from=build-cuda /opt/libtorch/lib /opt/libtorch/lib
COPY --from=build-cuda /out/strata-server /out/strata /out/strata-offline /usr/local/bin/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib:${LD_LIBRARY_PATH} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    STRATA_DEVICE=cuda
# libcuda.so.1 is the driver: the NVIDIA container runtime mounts it when the container starts.
RUN if ldd /usr/local/bin/strata-server /usr/local/bin/strata /usr/local/bin/strata-offline | grep -F 'not found' \
        | grep -v -e 'libcuda\.so' -e 'libnvidia-'; then exit 1; fi

############################################################################# final image
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="strata" \
      org.opencontainers.image.description="Strata: continual adaptation of LLMs over gRPC (${VARIANT})" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
# A short general-English text for the general-ability figures (strata_reference_nll): the reference
# NLL is measured after every task, through the merged weights and through automatic routing.
COPY deploy/reference/general.txt /usr/share/strata/reference.txt
RUN groupadd --gid 10001 strata \
 && useradd --uid 10001 --gid strata --home-dir /var/lib/strata --no-create-home \
        --shell /usr/sbin/nologin strata \
 && mkdir -p /var/lib/strata /models \
 && chown strata:strata /var/lib/strata
# Environment twins of the server flags (--host, --state_dir, --reference_text); the command line
# still wins.
# OMP_WAIT_POLICY=PASSIVE: OpenMP workers sleep while waiting (training and serving share the cores).
ENV STRATA_HOST=0.0.0.0 \
    STRATA_STATE_DIR=/var/lib/strata \
    STRATA_REFERENCE_TEXT=/usr/share/strata/reference.txt \
    HOME=/var/lib/strata \
    OMP_WAIT_POLICY=PASSIVE
USER 10001:10001
WORKDIR /var/lib/strata
VOLUME ["/var/lib/strata"]
# 50051: gRPC (strata.v1 + grpc.health.v1 + reflection); 8000: the OpenAI-compatible HTTP API;
# 9464: Prometheus /metrics.
EXPOSE 50051 8000 9464
# Through the CLI (grpc.health.v1 Check); the start period covers loading a 7B model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD strata health --server "127.0.0.1:${STRATA_GRPC_PORT:-50051}" --timeout 5 \
        ${STRATA_AUTH_TOKEN_FILE:+--auth-token-file "$STRATA_AUTH_TOKEN_FILE"} > /dev/null || exit 1
# strata-server waits for SIGTERM itself (sigwait), so it can run as PID 1. Give it time to
# checkpoint: `docker stop -t 300`, stop_grace_period in compose, terminationGracePeriodSeconds in k8s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["strata-server"]
