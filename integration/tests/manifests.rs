//! The Kubernetes manifests in `deploy/`, checked offline (no cluster, no
//! root): `deploy/validate.sh` validates every manifest and example against
//! the API schemas of Kubernetes 1.28 and 1.33 with `kubernetes-validate
//! --strict`, and `deploy/lint.py` checks the objects against each other,
//! `deploy/make-secrets.sh` and the daemons' flags in this repository's
//! sources. A copy of `deploy/` broken in one place must be refused, each
//! time for the reason broken.
//!
//! kubernetes-validate comes from `make deps` (scripts/install-deps.sh, into
//! target/tools/kv-venv; TABBY_KUBERNETES_VALIDATE overrides). A missing
//! tool fails these tests; they never skip.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate sits in the workspace")
        .to_path_buf()
}

fn kubernetes_validate() -> PathBuf {
    let p = std::env::var_os("TABBY_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools/kv-venv/bin/kubernetes-validate"));
    assert!(
        p.is_file(),
        "kubernetes-validate not found at {} (run `make deps`, i.e. scripts/install-deps.sh, \
         or set TABBY_KUBERNETES_VALIDATE)",
        p.display()
    );
    p
}

/// Runs `deploy/validate.sh` on `dir`: whether it passed, and all it printed.
fn validate(dir: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(repo().join("deploy/validate.sh"))
        .arg(dir)
        .env("KUBERNETES_VALIDATE", kubernetes_validate())
        .env_remove("TABBY_K8S_VERSIONS")
        .output()
        .expect("running bash deploy/validate.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn manifests_validate_against_kubernetes_1_28_and_1_33() {
    let (ok, out) = validate(&repo().join("deploy"));
    assert!(ok, "deploy/validate.sh failed:\n{out}");
    for v in ["1.28", "1.33"] {
        for object in ["deployment/tabby-controller", "daemonset/tabby-node"] {
            assert!(
                out.contains(&format!("resource {object} against version {v}")),
                "{object} was not validated against {v}:\n{out}"
            );
        }
    }
    assert!(out.contains("validate.sh: OK"), "{out}");
}

/// One break each: (file, text, replacement, what the refusal must say).
const BREAKS: &[(&str, &str, &str, &str)] = &[
    // Schema, strict: an unknown (misspelt) field, a wrong type, a kind with
    // no schema (which kubernetes-validate alone only warns about).
    (
        "20-node.yaml",
        "mountPropagation: HostToContainer",
        "mountPropogation: HostToContainer",
        "'mountPropogation' was unexpected",
    ),
    (
        "11-controller.yaml",
        "replicas: 1",
        "replicas: \"1\"",
        "is not of type 'integer'",
    ),
    (
        "20-node.yaml",
        "kind: DaemonSet",
        "kind: DaemonSett",
        "Couldn't find schema for kind DaemonSett",
    ),
    // The kustomization leaves a manifest out.
    (
        "kustomization.yaml",
        "  - 20-node.yaml\n",
        "",
        "does not list 20-node.yaml",
    ),
    // Against the sources: an env variable and a flag the binaries do not have.
    (
        "20-node.yaml",
        "name: TABBY_CNI_SOCKET",
        "name: TABBY_CNI_SOCK",
        "no flag with env = \"TABBY_CNI_SOCK\"",
    ),
    (
        "20-node.yaml",
        "- --cni-conf-dir",
        "- --cni-config-dir",
        "flag --cni-config-dir: no field cni_config_dir",
    ),
    // $(VAR) expansion of an undefined variable; a file the Secret lacks.
    (
        "20-node.yaml",
        "$(NODE_NAME).crt",
        "$(NODENAME).crt",
        "refers to $(NODENAME)",
    ),
    (
        "20-node.yaml",
        "$(NODE_NAME).key",
        "$(NODE_NAME)-key.pem",
        "no key of Secret tabby-nodes-tls",
    ),
    // A probe on an undeclared port; a Service selecting nothing.
    (
        "11-controller.yaml",
        "port: 5152",
        "port: 5153",
        "uses port 5153, which is not declared",
    ),
    (
        "12-controller-service.yaml",
        "  selector:\n    app.kubernetes.io/name: tabby-controller",
        "  selector:\n    app.kubernetes.io/name: tabby-controler",
        "matches no workload",
    ),
];

#[test]
fn broken_manifests_are_refused() {
    let src = repo().join("deploy");
    for (file, from, to, expect) in BREAKS {
        let d = tempfile::tempdir().unwrap();
        copy_dir(&src, d.path());
        let path = d.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(from),
            "{file} no longer contains {from:?}: update this case"
        );
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let (ok, out) = validate(d.path());
        assert!(
            !ok,
            "{file} with {from:?} -> {to:?} passed validation:\n{out}"
        );
        assert!(
            out.contains(expect),
            "{file} with {from:?} -> {to:?} was refused, but not saying {expect:?}:\n{out}"
        );
    }
}

/// The Grafana dashboard is JSON, and every metric its queries name is one
/// the daemons define (so a renamed metric cannot leave a blank panel).
#[test]
fn the_grafana_dashboard_names_only_real_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/grafana/tabby.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let sources: String = [
        "controller/src/metrics.rs",
        "node-client/src/metrics.rs",
        "runtime/src/metrics.rs",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(root.join(p)).unwrap())
    .collect();
    let panels = v["panels"].as_array().expect("panels");
    assert!(panels.len() >= 3);
    let mut names = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let Some(base) = word.strip_prefix("tabby_") else {
                    continue;
                };
                // Prometheus adds these suffixes to counters and histograms.
                let base = ["_bucket", "_total", "_count", "_sum"]
                    .iter()
                    .fold(base, |b, s| b.strip_suffix(s).unwrap_or(b));
                // The gRPC families are registered as "<prefix>_grpc_...".
                let defined = sources.contains(&format!("\"tabby_{base}\""))
                    || (base.starts_with("node_cni_grpc_")
                        && sources.contains("\"tabby_node_cni\""))
                    || (base.starts_with("grpc_") && sources.contains("_grpc_request"));
                assert!(
                    defined,
                    "the dashboard names tabby_{base}, which no daemon defines"
                );
                names += 1;
            }
        }
    }
    assert!(names >= 6, "only {names} metric names found");
}
