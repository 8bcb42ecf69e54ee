//! Interoperation with a real GoBGP (Debian `gobgpd`) in network namespaces:
//! tabby's session comes up with it, its IPv4 and IPv6 routes appear in
//! `gobgp global rib` with their next hops, a withdrawal removes one, and
//! stopping closes the session.
#![allow(clippy::unwrap_used)]

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tabby_bgp::{
    codec::{Capabilities, Open, Origin, Route},
    fsm::{Config, State},
    session::{self, Command as Cmd, Report, SessionConfig},
};
use tabby_integration::netns;

/// Namespaces and gobgpd, removed even when the test fails.
struct Lab {
    nss: Vec<String>,
    gobgpd: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.gobgpd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.nss {
            netns::del(n);
        }
    }
}

fn gobgp(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "gobgp", "-p", "50051"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `gobgp global rib` of a family as (prefix, next hop) pairs.
fn rib(ns: &str, family: &str) -> Vec<(String, String)> {
    let out = gobgp(ns, &["-j", "global", "rib", "-a", family]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(m) = v.as_object() {
        for (prefix, paths) in m {
            for p in paths.as_array().cloned().unwrap_or_default() {
                let nh = p["attrs"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .find_map(|a| a["nexthop"].as_str().map(str::to_string))
                    .unwrap_or_default();
                rows.push((prefix.clone(), nh));
            }
        }
    }
    rows.sort();
    rows
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn route(prefix: &str, nh: &str) -> Route {
    Route {
        prefix: prefix.parse().unwrap(),
        next_hop: nh.parse().unwrap(),
        origin: Origin::Igp,
        as_path: vec![],
        communities: vec![],
        local_pref: Some(100),
    }
}

/// gobgpd (AS 64512, 10.1.0.1) in one namespace and tabby's side
/// (10.1.0.2) in another, joined by a veth pair; `auth` is the neighbor's
/// TCP-MD5 password. Returns the lab and the two namespaces.
fn setup(name: &str, auth: Option<&str>) -> (Lab, String, String) {
    netns::require_root();
    let tag = format!("tb{name}{}", std::process::id() % 100_000);
    let (g, t) = (format!("{tag}-gobgp"), format!("{tag}-tabby"));
    let mut lab = Lab {
        nss: Vec::new(),
        gobgpd: None,
        dir: tempfile::tempdir().unwrap(),
    };
    for n in [&g, &t] {
        netns::add(n).unwrap();
        lab.nss.push(n.clone());
        netns::ip(n, "link set lo up").unwrap();
    }
    netns::ip(
        &g,
        &format!("link add eth0 type veth peer name eth0 netns {t}"),
    )
    .unwrap();
    netns::ip(&g, "addr add 10.1.0.1/24 dev eth0").unwrap();
    netns::ip(&g, "addr add fd00:1::1/64 dev eth0 nodad").unwrap();
    netns::ip(&t, "addr add 10.1.0.2/24 dev eth0").unwrap();
    netns::ip(&t, "addr add fd00:1::2/64 dev eth0 nodad").unwrap();
    netns::ip(&g, "link set eth0 up").unwrap();
    netns::ip(&t, "link set eth0 up").unwrap();
    let conf = lab.dir.path().join("gobgpd.toml");
    let auth = auth
        .map(|a| format!("\n    auth-password = \"{a}\""))
        .unwrap_or_default();
    std::fs::write(
        &conf,
        format!(
            r#"[global.config]
  as = 64512
  router-id = "10.1.0.1"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.1.0.2"
    peer-as = 64512{auth}
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#
        ),
    )
    .unwrap();
    let log = std::fs::File::create(lab.dir.path().join("gobgpd.log")).unwrap();
    lab.gobgpd = Some(
        Command::new("ip")
            .args(["netns", "exec", &g, "gobgpd", "-f"])
            .arg(&conf)
            .args(["--api-hosts", "127.0.0.1:50051"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait("gobgpd's API", || gobgp(&g, &["global"]).contains("64512"));
    (lab, g, t)
}

/// tabby's side: an active iBGP session from namespace `t`, driven on a
/// thread of its own. Returns its commands, its reports and the thread.
#[allow(clippy::type_complexity)]
fn start_session(
    t: &str,
    password: Option<&str>,
) -> (
    tokio::sync::mpsc::UnboundedSender<Cmd>,
    tokio::sync::mpsc::UnboundedReceiver<Report>,
    std::thread::JoinHandle<Result<(), anyhow::Error>>,
) {
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    let (_in_tx, in_rx) = tokio::sync::mpsc::unbounded_channel();
    let (rep_tx, rep_rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = SessionConfig {
        peer: "10.1.0.1:179".parse().unwrap(),
        fsm: Config {
            open: Open {
                asn: 64512,
                hold_time: 9,
                router_id: Ipv4Addr::new(10, 1, 0, 2),
                capabilities: Capabilities {
                    four_octet_as: Some(64512),
                    ipv4_unicast: true,
                    ipv6_unicast: true,
                    route_refresh: true,
                    graceful_restart: None,
                },
            },
            peer_asn: 64512,
            passive: false,
            connect_retry: Duration::from_millis(500),
            connect_retry_max: Duration::from_secs(5),
        },
        password: password.map(str::to_string),
    };
    let driver = netns::spawn_within(t, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(session::run(cfg, cmd_rx, in_rx, rep_tx));
        Ok(())
    })
    .unwrap();
    (cmd_tx, rep_rx, driver)
}

#[test]
fn routes_reach_gobgp_and_are_withdrawn() {
    let (_lab, g, t) = setup("r", None);
    let (cmd_tx, mut rep_rx, driver) = start_session(&t, None);
    cmd_tx
        .send(Cmd::Announce(vec![
            route("10.244.0.0/26", "10.1.0.2"),
            route("10.244.0.64/26", "10.1.0.3"),
            route("fd00:10:244::/122", "fd00:1::2"),
        ]))
        .unwrap();
    wait("Established", || {
        while let Ok(r) = rep_rx.try_recv() {
            if r == Report::State(State::Established) {
                return true;
            }
        }
        false
    });
    wait("the IPv4 routes in gobgp's RIB", || {
        rib(&g, "ipv4")
            == vec![
                ("10.244.0.0/26".into(), "10.1.0.2".into()),
                ("10.244.0.64/26".into(), "10.1.0.3".into()),
            ]
    });
    wait("the IPv6 route in gobgp's RIB", || {
        rib(&g, "ipv6") == vec![("fd00:10:244::/122".into(), "fd00:1::2".into())]
    });
    let nb = gobgp(&g, &["neighbor"]);
    assert!(nb.contains("10.1.0.2") && nb.contains("Establ"), "{nb}");

    // A withdrawal, and a change of next hop.
    cmd_tx
        .send(Cmd::Withdraw(vec!["10.244.0.64/26".parse().unwrap()]))
        .unwrap();
    cmd_tx
        .send(Cmd::Announce(vec![route("10.244.0.0/26", "10.1.0.9")]))
        .unwrap();
    wait("the withdrawal and the new next hop", || {
        rib(&g, "ipv4") == vec![("10.244.0.0/26".into(), "10.1.0.9".into())]
    });

    // Stop: a Cease, and gobgp drops our routes.
    cmd_tx.send(Cmd::Stop).unwrap();
    driver.join().unwrap().unwrap();
    wait("gobgp to drop the session's routes", || {
        rib(&g, "ipv4").is_empty()
    });
}

/// The `Rcvd` column (the last) of a row of `gobgp neighbor <addr>`'s
/// message statistics ("Route Refresh:", "Updates:").
fn received(g: &str, row: &str) -> u64 {
    let out = gobgp(g, &["neighbor", "10.1.0.2"]);
    out.lines()
        .find(|l| l.trim_start().starts_with(row))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// TCP-MD5 (RFC 2385): with gobgpd's neighbor password set, a session with
/// another password never comes up and says why; with the same one it
/// does. Route refresh (RFC 2918): a refresh request reaches gobgpd.
#[test]
fn a_tcp_md5_password_must_match_and_refresh_requests_reach_the_peer() {
    let (_lab, g, t) = setup("m", Some("s3cret"));
    let (cmd_tx, mut rep_rx, driver) = start_session(&t, Some("wrong"));
    let mut why = String::new();
    wait("the failed connection's reason", || {
        while let Ok(r) = rep_rx.try_recv() {
            assert_ne!(
                r,
                Report::State(State::Established),
                "up with the wrong password"
            );
            if let Report::Down(w) = r {
                why = w;
            }
        }
        !why.is_empty()
    });
    assert!(why.contains("TCP-MD5"), "{why}");
    cmd_tx.send(Cmd::Stop).unwrap();
    driver.join().unwrap().unwrap();

    let (cmd_tx, mut rep_rx, driver) = start_session(&t, Some("s3cret"));
    wait("Established with the password", || {
        while let Ok(r) = rep_rx.try_recv() {
            if r == Report::State(State::Established) {
                return true;
            }
        }
        false
    });
    let before = received(&g, "Route Refresh:");
    cmd_tx.send(Cmd::Refresh).unwrap();
    // One request per family of the session (IPv4 and IPv6 unicast).
    let t0 = Instant::now();
    while received(&g, "Route Refresh:") != before + 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "gobgpd counted {} refresh requests, {before} before: {}",
            received(&g, "Route Refresh:"),
            gobgp(&g, &["neighbor", "10.1.0.2"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cmd_tx.send(Cmd::Stop).unwrap();
    driver.join().unwrap().unwrap();
}
