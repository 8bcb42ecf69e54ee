#!/usr/bin/env python3
"""Checks of tabby's manifests that a schema cannot make (run by validate.sh).

kubernetes-validate checks each object against the API's schema; this checks
the objects against each other and against the daemons' sources:

- the kustomization lists every manifest of the directory, and only files
  that exist;
- every namespaced object is in tabby-system, no object is defined twice;
- a workload's selector matches its pod labels, its ServiceAccount exists,
  every volume is mounted and every mount has a volume, claims and
  ConfigMap keys exist, Secrets are the ones make-secrets.sh makes;
- every file a container is pointed at inside a Secret volume is a key of
  that Secret (its shape from examples/secrets.example.yaml);
- every $(VAR) in an env value is defined before it, or is a Service
  environment variable of a Service here (with service links on);
- every env variable, subcommand and --flag given to /tabby-controller or
  /tabby-node exists in that binary's sources (`env = "..."`, a field or
  variant of that name), so renaming a flag breaks this check, not a cluster;
- probes name declared ports and the container's own binary; a Service's
  selector matches a workload and its named targetPort exists;
- privileged containers do not set allowPrivilegeEscalation: false (the API
  refuses that pair).

Usage: lint.py DEPLOY_DIR REPO_ROOT. Prints one line per problem; exit 1 if any.
"""
import glob
import os
import re
import sys

import yaml

NAMESPACE = "tabby-system"
CLUSTER_SCOPED = {
    "Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding",
    "PriorityClass", "StorageClass",
}
# Which sources define each binary's flags (clap derive: `env = "X"`, fields
# named after the long flag, subcommand variants in CamelCase).
BINARIES = {
    "/tabby-controller": ["controller/src", "runtime/src"],
    "/tabby-node": ["node-client/src", "runtime/src"],
}

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def sources(repo, dirs):
    text = []
    for d in dirs:
        for p in glob.glob(os.path.join(repo, d, "**", "*.rs"), recursive=True):
            with open(p) as f:
                text.append(f.read())
    return "\n".join(text)


def service_env_names(svc):
    """The variables kubelet sets for a Service (docker-link ones left out)."""
    base = re.sub(r"[^A-Z0-9_]", "_", svc["metadata"]["name"].upper())
    names = {f"{base}_SERVICE_HOST", f"{base}_SERVICE_PORT"}
    for p in svc.get("spec", {}).get("ports", []):
        if p.get("name"):
            names.add(f"{base}_SERVICE_PORT_{re.sub(r'[^A-Z0-9_]', '_', p['name'].upper())}")
    return names


def check_binary_args(where, argv, src):
    """argv: a command as run in the container; src: that binary's sources."""
    args = argv[1:]
    if args and not args[0].startswith("-"):
        variant = "".join(w.capitalize() for w in args[0].split("-"))
        if not re.search(rf"\b{variant}\b", src):
            problem(where, f"subcommand {args[0]!r}: no variant {variant} in the sources")
    for a in args:
        if a.startswith("--"):
            field = a[2:].split("=", 1)[0].replace("-", "_")
            if not re.search(rf"\b{field}\b", src):
                problem(where, f"flag {a.split('=', 1)[0]}: no field {field} in the sources")


def main():
    deploy, repo = sys.argv[1], sys.argv[2]

    # The kustomization and the files it lists.
    kfile = os.path.join(deploy, "kustomization.yaml")
    kust = load(kfile)[0]
    listed = kust.get("resources", [])
    present = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(deploy, "*.yaml")) + glob.glob(os.path.join(deploy, "*.yml"))
        if os.path.basename(p) != "kustomization.yaml"
    )
    for f in listed:
        if not os.path.isfile(os.path.join(deploy, f)):
            problem("kustomization.yaml", f"lists {f}, which does not exist")
    for f in present:
        if f not in listed:
            problem("kustomization.yaml", f"does not list {f}")

    objs = []  # (file, object)
    for f in listed:
        p = os.path.join(deploy, f)
        if os.path.isfile(p):
            objs += [(f, o) for o in load(p)]
    examples = []
    for p in sorted(glob.glob(os.path.join(deploy, "examples", "**", "*.yaml"), recursive=True)):
        if os.path.basename(p) != "kustomization.yaml":
            examples += [(os.path.relpath(p, deploy), o) for o in load(p)]

    seen = set()
    for f, o in objs + examples:
        where = f"{f} {name_of(o)}"
        if not o.get("apiVersion") or not o.get("kind") or not o.get("metadata", {}).get("name"):
            problem(f, "an object without apiVersion, kind or metadata.name")
            continue
        ns = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            if ns:
                problem(where, "cluster-scoped, but has a namespace")
        elif ns != NAMESPACE:
            problem(where, f"namespace {ns!r}, not {NAMESPACE}")
        key = (o["kind"], ns, o["metadata"]["name"], f.startswith("examples"))
        if key in seen:
            problem(where, "defined twice")
        seen.add(key)

    by_kind = {}
    for _, o in objs:
        by_kind.setdefault(o.get("kind"), {})[o.get("metadata", {}).get("name")] = o

    # Secrets come from make-secrets.sh (never from a manifest); their keys
    # from the example of their shape.
    with open(os.path.join(deploy, "make-secrets.sh")) as f:
        made = set(re.findall(r"^[A-Z_]+_SECRET=([a-z0-9.-]+)$", f.read(), re.M))
    secret_keys = {}
    for f, o in examples:
        if o.get("kind") == "Secret":
            n = o["metadata"]["name"]
            secret_keys[n] = set(o.get("data", {})) | set(o.get("stringData", {}))
            if n not in made:
                problem(f"{f} {name_of(o)}", "make-secrets.sh does not make this Secret")
    for n in made:
        if n not in secret_keys:
            problem("make-secrets.sh", f"Secret {n} has no example in examples/secrets.example.yaml")

    services = list(by_kind.get("Service", {}).values())
    workloads = [(f, o) for f, o in objs if o.get("kind") in ("Deployment", "DaemonSet", "StatefulSet")]
    src_cache = {}

    for f, w in workloads:
        wname = f"{f} {name_of(w)}"
        spec = w["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"].get("metadata", {}).get("labels", {})
        for k, v in spec.get("selector", {}).get("matchLabels", {}).items():
            if labels.get(k) != v:
                problem(wname, f"selector {k}={v} does not match the pod labels")
        sa = pod.get("serviceAccountName")
        if sa and sa not in by_kind.get("ServiceAccount", {}):
            problem(wname, f"ServiceAccount {sa} is not defined")

        volumes = {}
        for v in pod.get("volumes", []):
            if v["name"] in volumes:
                problem(wname, f"volume {v['name']} defined twice")
            volumes[v["name"]] = v
            if "persistentVolumeClaim" in v:
                c = v["persistentVolumeClaim"]["claimName"]
                if c not in by_kind.get("PersistentVolumeClaim", {}):
                    problem(wname, f"claim {c} is not defined")
            if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                problem(wname, f"ConfigMap {v['configMap']['name']} is not defined")
            if "secret" in v and v["secret"]["secretName"] not in made:
                problem(wname, f"Secret {v['secret']['secretName']} is not made by make-secrets.sh")

        mounted = set()
        links = pod.get("enableServiceLinks", True)
        svc_env = set()
        if links:
            for s in services:
                if s["metadata"].get("namespace") == w["metadata"].get("namespace"):
                    svc_env |= service_env_names(s)

        containers = pod.get("initContainers", []) + pod.get("containers", [])
        for c in containers:
            cname = f"{wname} container {c['name']}"
            cmd = c.get("command", []) + c.get("args", [])
            binary = cmd[0] if cmd else None
            src = None
            if binary in BINARIES:
                if binary not in src_cache:
                    src_cache[binary] = sources(repo, BINARIES[binary])
                src = src_cache[binary]
                check_binary_args(cname, cmd, src)
            else:
                problem(cname, f"runs {binary!r}, not one of {sorted(BINARIES)}")

            secret_mounts = {}
            for m in c.get("volumeMounts", []):
                mounted.add(m["name"])
                v = volumes.get(m["name"])
                if v is None:
                    problem(cname, f"mounts volume {m['name']}, which is not defined")
                elif "secret" in v:
                    secret_mounts[m["mountPath"].rstrip("/") + "/"] = v["secret"]["secretName"]

            defined = set()
            for e in c.get("env", []):
                n = e["name"]
                if n in defined:
                    problem(cname, f"env {n} set twice")
                if src is not None and not re.search(rf'env\s*=\s*"{n}"', src):
                    problem(cname, f"env {n}: {binary} has no flag with env = \"{n}\"")
                value = e.get("value")
                if value is not None:
                    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                        if ref not in defined and ref not in svc_env:
                            problem(cname, f"env {n} refers to $({ref}), not defined before it"
                                    + ("" if links else " (service links are off)"))
                    for mp, secret in secret_mounts.items():
                        if value.startswith(mp):
                            rel = value[len(mp):]
                            pat = re.escape(rel).replace(re.escape("$(NODE_NAME)"), r"[a-z0-9.-]+")
                            keys = secret_keys.get(secret, set())
                            if not any(re.fullmatch(pat, k) for k in keys):
                                problem(cname, f"env {n}={value}: no key of Secret {secret} "
                                        f"({sorted(keys)}) gives {rel}")
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = by_kind.get("ConfigMap", {}).get(ref["name"])
                    if cm is None:
                        problem(cname, f"env {n}: ConfigMap {ref['name']} is not defined")
                    elif ref["key"] not in cm.get("data", {}):
                        problem(cname, f"env {n}: ConfigMap {ref['name']} has no key {ref['key']}")
                defined.add(n)

            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                for kind in ("grpc", "httpGet", "tcpSocket"):
                    if kind in pr:
                        port = pr[kind]["port"]
                        if port not in ports.values() and port not in ports:
                            problem(cname, f"{probe} uses port {port}, which is not declared")
                if "exec" in pr:
                    argv = pr["exec"]["command"]
                    if argv[0] != binary:
                        problem(cname, f"{probe} runs {argv[0]}, not the container's {binary}")
                    elif src is not None:
                        check_binary_args(f"{cname} {probe}", argv, src)

            sc = c.get("securityContext", {})
            if sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False:
                problem(cname, "privileged with allowPrivilegeEscalation: false (the API refuses it)")

        for v in volumes:
            if v not in mounted:
                problem(wname, f"volume {v} is mounted by no container")

    for s in services:
        sname = f"Service/{s['metadata']['name']}"
        sel = s.get("spec", {}).get("selector", {})
        targets = [
            w for _, w in workloads
            if all(w["spec"]["template"].get("metadata", {}).get("labels", {}).get(k) == v
                   for k, v in sel.items())
        ]
        if not targets:
            problem(sname, f"selector {sel} matches no workload")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            if isinstance(tp, str):
                for w in targets:
                    names = {
                        q.get("name")
                        for c in w["spec"]["template"]["spec"]["containers"]
                        for q in c.get("ports", [])
                    }
                    if tp not in names:
                        problem(sname, f"targetPort {tp} is not a port of {name_of(w)}")

    for p in problems:
        print(f"LINT {p}")
    print(f"lint: {len(objs)} objects in {len(listed)} files, {len(examples)} example objects, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
