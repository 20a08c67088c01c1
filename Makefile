# One-line builds. The work is in scripts/ so that it also runs without make.

.PHONY: images images-cuda images-check-cuda images-test

# Static release binaries (target/images/) and the sandbox-sidecar, operator and CPU trainer
# images, tagged with the crate version.
images:
	scripts/build-images.sh

# Also the CUDA trainer (needs nvcc and a pullable nvidia/cuda base).
images-cuda:
	scripts/build-images.sh --cuda

# The three images, then images/trainer-cuda.Dockerfile built on a local stand-in base.
images-check-cuda:
	scripts/build-images.sh --check-cuda

# Builds the images (as `make images`) and runs their tests: each binary from its image as the
# non-root user, the sidecar's install into a volume, the CUDA Dockerfile on a stand-in base.
images-test:
	SELFPLAY_IMAGE_TESTS=1 cargo test -p selfplay-tests --test images

# The Docker path on one machine: the sample SWE-bench-style environment image (built from
# Debian's packages), a static sidecar, and two training steps in Docker sandboxes.
.PHONY: sample-env
sample-env:
	scripts/sample-env.sh
