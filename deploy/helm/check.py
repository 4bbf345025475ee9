#!/usr/bin/env python3
"""Offline checks of the muxgate Helm chart (deploy/helm/muxgate).

No cluster, no network and no helm binary: Helm's own Go SDK (the
helm-python-sdk wheel) lints and renders the chart, and kubernetes-validate's
bundled OpenAPI schemas check every rendered manifest, strictly (unknown
fields are errors), for Kubernetes 1.30 and for the newest version it knows.

For the chart's default values and for ci-values.yaml (every optional part
on):
  1. helm lint --strict, for each Kubernetes version: any warning or error
     fails;
  2. helm template: the resource kinds rendered, and what the chart promises
     (checksum/config only without watch_config, the preStop, the grace
     period, the HPA's metrics);
  3. kubernetes-validate --strict of every manifest, for each version. The
     ServiceMonitor is a CRD, not in those schemas: it is checked against the
     minimal schema below instead, and said so;
  4. with --muxgate BIN, `BIN check --config` on the rendered config file.
Then values the chart must refuse (a grace period below the rule, a loopback
admin listener) must fail the render.

Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import jsonschema
import yaml
from kubernetes_validate import utils as kv
from kubernetes_validate.version import __version__ as KV_VERSION

HERE = Path(__file__).resolve().parent
CHART = HERE / "muxgate"
RELEASE = "muxgate"
NAMESPACE = "muxgate"

# Kubernetes versions to validate for: 1.30 (the first with the preStop sleep
# action on by default) and the newest kubernetes-validate bundles.
VERSIONS = ["1.30.0", kv.latest_version()]

# CRDs are not in kubernetes-validate's schemas; the chart's one is checked
# against this much of the Prometheus Operator's ServiceMonitor schema (what
# the chart sets; unknown fields are errors, as with --strict).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^([0-9]+(ms|s|m|h))+$",
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL {message}")


def expect(condition: bool, message: str) -> None:
    if condition:
        print(f"ok   {message}")
    else:
        fail(message)


def lint(label: str, values: dict | None) -> None:
    for version in VERSIONS:
        print(f"== helm lint --strict ({label}, kube {version})")
        report = helm.lint(
            CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}"
        )
        names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
        for m in report.get("messages") or []:
            print(f"[{names.get(m['severity'], m['severity'])}] {m['path']}: {m['error']}")
        errors = report.get("errors") or []
        for e in errors:
            print(f"[ERROR] {e}")
        bad = [m for m in report.get("messages") or [] if m["severity"] >= 2]
        print(
            f"{report['total_charts_linted']} chart(s) linted, "
            f"{len(bad) + len(errors)} chart(s) failed"
        )
        if bad or errors:
            fail(f"helm lint ({label}, kube {version})")


def render(values: dict | None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                docs.append(doc)
    return docs


def validate(label: str, docs: list[dict]) -> None:
    for version in VERSIONS:
        print(f"== kubernetes-validate {KV_VERSION} --strict ({label}, kube {version})")
        for doc in docs:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            try:
                against = kv.validate(doc, version, strict=True)
                print(f"INFO {name} passed against version {against}")
            except kv.SchemaNotFoundError:
                schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
                if schema is None:
                    fail(f"{name} ({doc['apiVersion']}): no schema, kube {version}")
                    continue
                try:
                    jsonschema.Draft202012Validator(schema).validate(doc)
                    print(
                        f"SKIP {name}: a CRD ({doc['apiVersion']}), not in "
                        f"kubernetes-validate's schemas; passed the chart's minimal schema"
                    )
                except jsonschema.ValidationError as e:
                    fail(f"{name} against the minimal CRD schema: {e.message}")
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                fail(f"{name} did not validate against version {e.version}: {path}: {e.message}")
            except (kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
                fail(f"{name}, kube {version}: {e.message}")


def find(docs: list[dict], kind: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind), None)


def promises(label: str, docs: list[dict], values: dict) -> None:
    print(f"== what the chart promises ({label})")
    merged = values
    server = merged["config"].get("server") or {}
    deploy = find(docs, "Deployment")
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    annotations = pod["metadata"].get("annotations") or {}
    watch = bool(server.get("watch_config"))
    expect(
        ("checksum/config" in annotations) != watch,
        f"checksum/config {'absent' if watch else 'present'} with watch_config {watch}",
    )
    expect(
        container["args"] == ["--config", "/etc/muxgate/upstreams.yaml", "--log-format", "json"],
        "args: --config /etc/muxgate/upstreams.yaml --log-format json",
    )
    mount = container["volumeMounts"][0]
    expect(
        mount["mountPath"] == "/etc/muxgate" and "subPath" not in mount,
        "the config directory is mounted whole (no subPath), so updates reach the pod",
    )
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["upstreams.yaml"])
    expect(config == merged["config"], "the ConfigMap's upstreams.yaml is the config value")
    probes = (container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"])
    expect(
        probes == ({"path": "/readyz", "port": "admin"}, {"path": "/healthz", "port": "admin"}),
        "readiness /readyz and liveness /healthz on the admin port",
    )
    sc = container["securityContext"]
    expect(
        sc.get("runAsNonRoot") is True
        and sc.get("readOnlyRootFilesystem") is True
        and sc.get("capabilities", {}).get("drop") == ["ALL"]
        and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        "non-root, read-only root, no capabilities, RuntimeDefault seccomp",
    )
    pre = container.get("lifecycle", {}).get("preStop", {})
    action = merged["preStop"]["action"]
    expect(action in pre, f"preStop {action}: {pre}")
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    shutdown = int(str(server.get("shutdown_grace", "10s")).rstrip("s"))
    least = merged["preStop"]["seconds"] + shutdown + 5
    expect(grace >= least, f"terminationGracePeriodSeconds {grace} >= preStop + shutdown_grace + 5 = {least}")
    hpa = find(docs, "HorizontalPodAutoscaler")
    kinds = [m["type"] for m in hpa["spec"]["metrics"]] if hpa else []
    want = ["Resource", "Pods"] if merged["autoscaling"]["sessions"]["enabled"] else ["Resource"]
    expect(kinds == want, f"HPA metrics {kinds}")
    expect("replicas" not in deploy["spec"], "no Deployment replicas while the HPA owns the count")


def muxgate_check(label: str, docs: list[dict], binary: str) -> None:
    print(f"== muxgate check ({label})")
    text = find(docs, "ConfigMap")["data"]["upstreams.yaml"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "upstreams.yaml")
        Path(path).write_text(text)
        run = subprocess.run([binary, "check", "--config", path], capture_output=True, text=True)
        print((run.stdout + run.stderr).strip())
        if run.returncode != 0:
            fail(f"muxgate check ({label}) exited {run.returncode}")


def refused(label: str, values: dict, needle: str) -> None:
    try:
        render(values)
    except helm.HelmError as e:
        expect(needle in str(e), f"refused: {label} ({needle!r} in the error)")
        return
    fail(f"rendered, should have been refused: {label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--muxgate", help="a muxgate binary: run `check` on each rendered config")
    args = parser.parse_args()

    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {KV_VERSION}, kube {VERSIONS}")
    ci_values = helm.values_from_yaml((HERE / "ci-values.yaml").read_text())
    for label, values in (("default values", None), ("ci-values.yaml", ci_values)):
        lint(label, values)
        print(f"== helm template {RELEASE} {CHART.relative_to(HERE.parent.parent)} ({label})")
        try:
            rendered = render(values)
        except helm.HelmError as e:
            fail(f"helm template ({label}): {e}")
            continue
        docs = manifests(rendered)
        for doc in docs:
            print(f"{doc['apiVersion']} {doc['kind']} {doc['metadata']['name']}")
        with helm.Chart.load(CHART) as chart:
            merged = chart.merge_values(values)
        promises(label, docs, merged)
        validate(label, docs)
        if args.muxgate:
            muxgate_check(label, docs, args.muxgate)

    print("== values the chart must refuse")
    refused(
        "terminationGracePeriodSeconds below the rule",
        {"terminationGracePeriodSeconds": 12},
        "below preStop.seconds + config.server.shutdown_grace",
    )
    refused(
        "admin_listen on loopback",
        {"config": {"server": {"admin_listen": "127.0.0.1:9090"}}},
        "must listen on all addresses",
    )
    refused(
        "an unreadable shutdown_grace",
        {"config": {"server": {"shutdown_grace": "ten seconds"}}},
        "cannot read the duration",
    )

    if failures:
        print(f"\n{len(failures)} check(s) failed:")
        for f in failures:
            print(f"  {f}")
        return 1
    print("\nall chart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
