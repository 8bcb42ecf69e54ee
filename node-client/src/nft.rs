//! The `ip tabby` / `ip6 tabby` nftables tables: two
//! interval sets and one masquerade rule, written with `nft -f -` as one
//! atomic transaction per change. No other table is ever touched.
use crate::{Error, Result};
use ipnet::IpNet;
use std::{
    io::Write,
    process::{Command, Stdio},
};

/// Name of the table (in both the `ip` and `ip6` families).
pub const TABLE: &str = "tabby";

pub use tabby_routing::NatSets;

fn elements(v: &[IpNet]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders the transaction that makes table `<family> tabby` match `sets`.
/// `family` is "ip" or "ip6". The table is ours alone, so the transaction
/// deletes it (if present) and writes it whole: anything added or changed by
/// hand goes, and the kernel applies it all at once, with no moment without
/// the masquerade rule.
pub fn render(family: &str, sets: &NatSets) -> String {
    let ty = if family == "ip6" {
        "ipv6_addr"
    } else {
        "ipv4_addr"
    };
    let saddr = if family == "ip6" { "ip6" } else { "ip" };
    let mut s = format!(
        "add table {family} {TABLE}\n\
         delete table {family} {TABLE}\n\
         add table {family} {TABLE}\n\
         add set {family} {TABLE} masq-pools {{ type {ty}; flags interval; }}\n\
         add set {family} {TABLE} all-pools {{ type {ty}; flags interval; }}\n\
         add chain {family} {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add rule {family} {TABLE} postrouting {saddr} saddr @masq-pools {saddr} daddr != @all-pools masquerade fully-random\n"
    );
    if !sets.masq.is_empty() {
        s.push_str(&format!(
            "add element {family} {TABLE} masq-pools {{ {} }}\n",
            elements(&sets.masq)
        ));
    }
    if !sets.all.is_empty() {
        s.push_str(&format!(
            "add element {family} {TABLE} all-pools {{ {} }}\n",
            elements(&sets.all)
        ));
    }
    s
}

/// Runs `nft`, optionally through a command prefix (tests use
/// `ip netns exec <ns>`; production runs in the node's own namespace).
#[derive(Debug, Clone, Default)]
pub struct Nft {
    prefix: Vec<String>,
}

impl Nft {
    /// nft in the current network namespace.
    pub fn new() -> Nft {
        Nft::default()
    }

    /// nft behind a command prefix, e.g. `["ip", "netns", "exec", "ns1"]`.
    pub fn with_prefix(prefix: Vec<String>) -> Nft {
        Nft { prefix }
    }

    fn command(&self) -> Command {
        match self.prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg("nft");
                c
            }
            None => Command::new("nft"),
        }
    }

    /// Applies a transaction atomically (`nft -f -`).
    pub fn apply(&self, script: &str) -> Result<()> {
        let mut child = self
            .command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io("running nft (is the nftables package installed?)".into(), e))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .map_err(|e| Error::Io("writing to nft".into(), e))?;
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Io("waiting for nft".into(), e))?;
        if !out.status.success() {
            return Err(Error::Nft {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                script: Some(script.to_string()),
            });
        }
        Ok(())
    }

    /// Makes `<family> tabby` match `sets` in one transaction.
    pub fn sync(&self, family: &str, sets: &NatSets) -> Result<()> {
        self.apply(&render(family, sets))
    }

    /// Removes `<family> tabby` if present.
    pub fn remove(&self, family: &str) -> Result<()> {
        // "add" first makes the delete succeed whether or not it existed.
        self.apply(&format!(
            "add table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        ))
    }

    /// `nft list table <family> tabby` as text.
    pub fn list(&self, family: &str) -> Result<String> {
        let out = self
            .command()
            .args(["list", "table", family, TABLE])
            .output()
            .map_err(|e| Error::Io("running nft".into(), e))?;
        if !out.status.success() {
            return Err(Error::Nft {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                script: None,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl crate::kernel::NatTables for Nft {
    fn sync(&self, family: &str, sets: &NatSets) -> Result<()> {
        Nft::sync(self, family, sets)
    }
    fn list(&self, family: &str) -> Result<String> {
        Nft::list(self, family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sets_and_rule() {
        let s = render(
            "ip",
            &NatSets {
                masq: vec!["10.244.0.0/16".parse().unwrap()],
                all: vec![
                    "10.244.0.0/16".parse().unwrap(),
                    "10.96.0.0/16".parse().unwrap(),
                ],
            },
        );
        assert!(s.contains("priority srcnat"));
        assert!(
            s.starts_with("add table ip tabby\ndelete table ip tabby\nadd table ip tabby\n"),
            "rewrites the whole table: {s}"
        );
        assert!(s.contains("ip saddr @masq-pools ip daddr != @all-pools masquerade fully-random"));
        assert!(s.contains("add element ip tabby all-pools { 10.244.0.0/16, 10.96.0.0/16 }"));
        let empty = render("ip6", &NatSets::default());
        assert!(
            !empty.contains("add element"),
            "empty sets have no element line"
        );
        assert!(empty.contains("ip6 saddr @masq-pools") && empty.contains("type ipv6_addr"));
    }
}
