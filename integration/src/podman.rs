//! The lab's components as containers: podman (runc) with the project's own
//! containers.conf, the images `make images` builds, and the DaemonSet's and
//! Deployment's mounts. Containers join the lab's namespaces
//! (`--network ns:/run/netns/<ns>`), never the machine's own.
use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The images a container lab runs, and the podman configuration they were
/// built with.
#[derive(Debug, Clone)]
pub struct Images {
    /// The controller image (`localhost/tabby-controller:dev`).
    pub controller: String,
    /// The node image: tabby-node, the plugin, its conflist, nft.
    pub node: String,
    /// The `CONTAINERS_CONF` file (runc, default ulimits that need no raising).
    pub containers_conf: PathBuf,
}

impl Images {
    /// The images `make images` tags, with its containers.conf under `root`
    /// (the workspace).
    pub fn dev(root: &Path) -> Images {
        Images {
            controller: "localhost/tabby-controller:dev".into(),
            node: "localhost/tabby-node:dev".into(),
            containers_conf: root.join("target/images/containers.conf"),
        }
    }

    /// Runs `scripts/build-images.sh` in `root` (static binaries, then both
    /// images, then its smoke check) and returns the images.
    pub fn build(root: &Path) -> Result<Images> {
        let out = Command::new("bash")
            .arg(root.join("scripts/build-images.sh"))
            .current_dir(root)
            .output()
            .context("running scripts/build-images.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/build-images.sh failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let images = Images::dev(root);
        for i in [&images.controller, &images.node] {
            podman(&images.containers_conf, &["image", "exists", i])
                .with_context(|| format!("image {i} after the build"))?;
        }
        Ok(images)
    }
}

/// A podman command with the lab's configuration.
pub fn command(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf);
    c
}

/// Runs podman to completion; fails with its stderr.
pub fn podman(conf: &Path, args: &[&str]) -> Result<String> {
    let out = command(conf)
        .args(args)
        .output()
        .context("running podman")?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes containers by name, running or not (what a lab started; unknown
/// names are fine).
pub fn remove(conf: &Path, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let mut args = vec!["rm", "--force", "--ignore", "--time", "0"];
    args.extend(names.iter().map(String::as_str));
    let _ = podman(conf, &args);
}
