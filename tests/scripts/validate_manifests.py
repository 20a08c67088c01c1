"""Validates every object of multi-document YAML files, strictly.

- Kubernetes kinds: kubernetes-validate's JSON schemas of the given Kubernetes version, in
  strict mode (unknown fields are errors).
- Prometheus Operator kinds (monitoring.coreos.com/v1 ServiceMonitor, PodMonitor,
  PrometheusRule): the pydantic models that cloudcoil generates from the operator's CRDs.
  The models ignore unknown fields, so the object is also dumped back and compared with the
  input: anything dropped on the way is an unknown field, hence an error.
- Any other kind is reported "unknown" (the caller decides).

Prints one JSON object per line: {"file", "kind", "name", "result": ok|error|unknown, "detail"}.

usage: validate_manifests.py KUBERNETES_VERSION FILE...
"""

import json
import sys

import kubernetes_validate
import yaml

PROMETHEUS_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def dropped_fields(given, kept, path=""):
    """Paths present in `given` but missing from `kept` (the model's dump)."""
    out = []
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        for key, value in given.items():
            sub = f"{path}.{key}" if path else key
            if key not in kept:
                out.append(sub)
            else:
                out.extend(dropped_fields(value, kept[key], sub))
    elif isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            return [path]
        for i, (g, k) in enumerate(zip(given, kept)):
            out.extend(dropped_fields(g, k, f"{path}[{i}]"))
    return out


def validate_prometheus(obj):
    from cloudcoil.models.prometheus_operator import v1

    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        return "error", f"unexpected apiVersion {obj.get('apiVersion')}"
    model = getattr(v1, obj["kind"])
    try:
        parsed = model.model_validate(obj)
    except Exception as e:  # pydantic.ValidationError
        return "error", str(e)
    dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    unknown = dropped_fields(obj, dumped)
    if unknown:
        return "error", "unknown fields: " + ", ".join(unknown)
    return "ok", "prometheus-operator v0.80 models (cloudcoil), unknown fields checked"


def validate(obj, version):
    kind = obj.get("kind", "")
    if kind in PROMETHEUS_KINDS:
        return validate_prometheus(obj)
    try:
        checked = kubernetes_validate.validate(obj, version, strict=True)
        return "ok", f"kubernetes {checked} strict"
    except kubernetes_validate.SchemaNotFoundError as e:
        return "unknown", e.message
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return "error", f"{path}: {e.message}"


def main(version, files):
    for name in files:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for obj in docs:
            result, detail = validate(obj, version)
            print(json.dumps({
                "file": name,
                "kind": obj.get("kind"),
                "name": (obj.get("metadata") or {}).get("name"),
                "result": result,
                "detail": detail,
            }))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
