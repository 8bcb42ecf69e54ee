//! Daemons a bench starts inside its namespaces, and waiting on their logs.
use super::check_interrupted;
use anyhow::{bail, Context, Result};
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Processes this bench started; all are killed (by pid) when dropped.
pub struct Procs {
    dir: PathBuf,
    list: Vec<(String, Child)>,
}

impl Procs {
    pub fn new(dir: &Path) -> Procs {
        Procs {
            dir: dir.to_path_buf(),
            list: Vec::new(),
        }
    }

    pub fn log(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.log"))
    }

    /// Starts `bin args` inside `ns` (`ip netns exec` execs it: the child's
    /// pid is the daemon's), output to `<role>.log`.
    pub fn spawn(
        &mut self,
        role: &str,
        ns: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<u32> {
        let logf = fs::File::create(self.log(role))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            // Own process group: a Ctrl-C on the bench does not reach them;
            // the bench kills them itself while unwinding.
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        self.list.push((role.to_string(), child));
        Ok(pid)
    }

    /// Fails (with the log tail) when a process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (role, c) in self.list.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                let log =
                    fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{role} exited ({st}); log tail:\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }

    pub fn kill_all(&mut self) {
        for (_, c) in self.list.iter_mut() {
            // Child::kill is kill(pid, SIGKILL) on our own unreaped child.
            let _ = c.kill();
        }
        for (_, mut c) in self.list.drain(..) {
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Waits for `needle` in a log file.
pub fn wait_log(p: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        check_interrupted()?;
        let s = fs::read_to_string(p).unwrap_or_default();
        if s.contains(needle) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("timed out waiting for {needle:?} in {}:\n{s}", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
