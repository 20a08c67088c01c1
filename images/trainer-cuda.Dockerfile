# The CUDA trainer. Its base is NVIDIA's CUDA runtime image (cuBLAS and cuRAND, which candle's
# CUDA backend loads; the driver's libcuda comes from the node through the NVIDIA container
# toolkit), so this image cannot be built without pulling that base.
#
# The binary is the one the CUDA build makes (`scripts/build-images.sh --cuda`, on a machine with
# nvcc and a CUDA toolkit of the same major version as the base):
#
#   cargo build --release --locked -p selfplay-trainer --features cuda --target-dir target/images/cuda
#
# It is linked dynamically against glibc (cudarc loads the CUDA libraries with dlopen, which a
# static glibc binary cannot do), so build it where glibc is no newer than the base's (Ubuntu
# 24.04: 2.39). The script stages it as bin/trainer-cuda in target/images/context.
#
# Build: docker build -f images/trainer-cuda.Dockerfile target/images/context \
#          -t ghcr.io/selfplay-dev/trainer:<version>-cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=https://github.com/selfplay-dev/selfplay
LABEL org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="selfplay" \
      org.opencontainers.image.title="trainer" \
      org.opencontainers.image.description="selfplay trainer (CUDA): self-play SWE-RL with GRPO"
COPY bin/trainer-cuda /usr/local/bin/trainer
# The same uid as the CPU image and the operator's trainer pods (TRAINER_USER).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/trainer"]
