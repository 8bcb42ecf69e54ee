//! `tabby-node install-cni`: puts the `tabby` plugin and its conflist into
//! the host's CNI directories (a DaemonSet's init container). Each file is
//! written beside its destination, flushed, then renamed over it, so the
//! kubelet never reads half a file; the plugin goes first, so a conflist
//! the kubelet sees always has its plugin.
use crate::{Error, Result};
use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// What to install where.
#[derive(Debug, Clone)]
pub struct Install {
    /// The plugin binary to copy (in the node image).
    pub plugin: PathBuf,
    /// The conflist to copy.
    pub conflist: PathBuf,
    /// The host's CNI binary directory (e.g. /opt/cni/bin, mounted).
    pub bin_dir: PathBuf,
    /// The host's CNI config directory (e.g. /etc/cni/net.d, mounted).
    pub conf_dir: PathBuf,
}

/// The file names written.
pub const PLUGIN_NAME: &str = "tabby";

/// Checks everything first, then writes: a refused install writes nothing.
/// Returns the two destination paths.
pub fn install(i: &Install) -> Result<(PathBuf, PathBuf)> {
    for (what, d) in [("CNI binary", &i.bin_dir), ("CNI config", &i.conf_dir)] {
        let m = std::fs::metadata(d)
            .map_err(|e| Error::Io(format!("{what} directory {}", d.display()), e))?;
        if !m.is_dir() {
            return Err(Error::Invalid(format!(
                "{what} directory {} is not a directory",
                d.display()
            )));
        }
    }
    let plugin = std::fs::read(&i.plugin)
        .map_err(|e| Error::Io(format!("plugin {}", i.plugin.display()), e))?;
    if plugin.is_empty() {
        return Err(Error::Invalid(format!(
            "plugin {} is empty",
            i.plugin.display()
        )));
    }
    let conflist = std::fs::read(&i.conflist)
        .map_err(|e| Error::Io(format!("conflist {}", i.conflist.display()), e))?;
    check_conflist(&i.conflist, &conflist)?;
    let name = i
        .conflist
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} names no file", i.conflist.display())))?;
    let conf_dst = i.conf_dir.join(name);
    // Something else's broken file where ours goes: say so rather than
    // replace what an operator may be editing.
    match std::fs::read(&conf_dst) {
        Ok(old) => {
            if serde_json::from_slice::<serde_json::Value>(&old).is_err() {
                return Err(Error::Invalid(format!(
                    "the existing {} is not valid JSON; fix or remove it, then run again",
                    conf_dst.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io(format!("reading {}", conf_dst.display()), e)),
    }
    // Both directories must take a file before either gets one.
    for d in [&i.bin_dir, &i.conf_dir] {
        probe_writable(d)?;
    }
    let plugin_dst = i.bin_dir.join(PLUGIN_NAME);
    write_atomic(&plugin_dst, &plugin, 0o755)?;
    write_atomic(&conf_dst, &conflist, 0o644)?;
    Ok((plugin_dst, conf_dst))
}

/// A conflist tabby can install: JSON with a name, a cniVersion and a
/// `plugins` list holding a `tabby` plugin.
fn check_conflist(path: &Path, data: &[u8]) -> Result<()> {
    let bad = |why: &str| Error::Invalid(format!("conflist {}: {why}", path.display()));
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| bad(&format!("not JSON: {e}")))?;
    for k in ["name", "cniVersion"] {
        if !v.get(k).is_some_and(serde_json::Value::is_string) {
            return Err(bad(&format!("no string {k:?}")));
        }
    }
    let plugins = v
        .get("plugins")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad("no \"plugins\" list"))?;
    if !plugins
        .iter()
        .any(|p| p.get("type").and_then(serde_json::Value::as_str) == Some(PLUGIN_NAME))
    {
        return Err(bad("no plugin of type \"tabby\""));
    }
    Ok(())
}

fn probe_writable(dir: &Path) -> Result<()> {
    let p = dir.join(format!(".tabby-install-probe.{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .map_err(|e| Error::Io(format!("{} is not writable", dir.display()), e))?;
    let _ = std::fs::remove_file(&p);
    Ok(())
}

/// Writes `data` to a new file beside `path`, flushes it, renames it over
/// `path`, and flushes the directory. On any failure the temporary file is
/// removed and `path` is as it was.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tabby-install.{}", std::process::id()));
    let io = |what: &str, e| Error::Io(format!("{what} {}", tmp.display()), e);
    let _ = std::fs::remove_file(&tmp);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        f.write_all(data).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("flushing", e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::Io(format!("renaming over {}", path.display()), e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CONFLIST: &str =
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"tabby"}]}"#;

    fn setup() -> (tempfile::TempDir, Install) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        for p in ["src", "bin", "net.d"] {
            std::fs::create_dir(d.path().join(p)).unwrap();
        }
        std::fs::write(src.join("tabby"), b"\x7fELF plugin").unwrap();
        std::fs::write(src.join("10-tabby.conflist"), CONFLIST).unwrap();
        let i = Install {
            plugin: src.join("tabby"),
            conflist: src.join("10-tabby.conflist"),
            bin_dir: d.path().join("bin"),
            conf_dir: d.path().join("net.d"),
        };
        (d, i)
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn installs_both_files_and_a_second_run_replaces_them() {
        let (_d, i) = setup();
        let (p, c) = install(&i).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(std::fs::read_to_string(&c).unwrap(), CONFLIST);
        std::fs::write(&i.plugin, b"\x7fELF plugin v2").unwrap();
        install(&i).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"\x7fELF plugin v2");
        // Nothing but the two files: no temporary files left behind.
        assert_eq!(entries(&i.bin_dir), ["tabby"]);
        assert_eq!(entries(&i.conf_dir), ["10-tabby.conflist"]);
    }

    #[test]
    fn bad_input_is_a_clear_error_and_writes_nothing() {
        // Missing destination directory.
        let (_d, mut i) = setup();
        i.conf_dir = i.conf_dir.join("missing");
        let e = install(&i).unwrap_err().to_string();
        assert!(e.contains("CNI config directory"), "{e}");
        assert!(entries(&i.bin_dir).is_empty(), "nothing written");

        // A malformed conflist where ours goes.
        let (_d, i) = setup();
        std::fs::write(i.conf_dir.join("10-tabby.conflist"), "{ half").unwrap();
        let e = install(&i).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        assert!(entries(&i.bin_dir).is_empty(), "nothing written");
        assert_eq!(
            std::fs::read_to_string(i.conf_dir.join("10-tabby.conflist")).unwrap(),
            "{ half"
        );

        // A source conflist that is not tabby's.
        let (_d, i) = setup();
        std::fs::write(
            &i.conflist,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let e = install(&i).unwrap_err().to_string();
        assert!(e.contains("no plugin of type"), "{e}");
        assert!(entries(&i.bin_dir).is_empty() && entries(&i.conf_dir).is_empty());
    }

    #[test]
    fn an_unwritable_or_wrong_directory_writes_nothing() {
        // /proc/self is a directory nobody (not even root) can create files in.
        let (_d, mut i) = setup();
        i.conf_dir = PathBuf::from("/proc/self");
        let e = install(&i).unwrap_err().to_string();
        assert!(e.contains("not writable"), "{e}");
        assert!(
            entries(&i.bin_dir).is_empty(),
            "the plugin was written anyway"
        );

        let (_d, mut i) = setup();
        let f = i.bin_dir.join("not-a-dir");
        std::fs::write(&f, b"x").unwrap();
        i.conf_dir = f;
        let e = install(&i).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        assert_eq!(entries(&i.bin_dir), ["not-a-dir"]);
    }
}
