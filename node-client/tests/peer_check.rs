//! The CNI socket's peer check over a real Unix socket: a client running as
//! another uid is refused PERMISSION_DENIED unless that uid is allowed, and
//! root always may call. The client is this test binary run again as uid
//! 65534 (`PEER_CHECK_CLIENT` set), so the kernel's SO_PEERCRED is what is
//! checked. Needs root (to run a child as another uid); fails without it.
#![allow(clippy::unwrap_used)]
use std::{
    os::unix::fs::PermissionsExt, os::unix::process::CommandExt, path::Path, time::Duration,
};
use tabby_node::peer::PeerCheckLayer;
use tonic::transport::{Endpoint, Server, Uri};

const NOBODY: u32 = 65534;

/// Serves grpc.health.v1 on `sock` behind the peer check; returns when
/// `stop` fires.
async fn serve(sock: &Path, allowed: Vec<u32>, stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        .layer(PeerCheckLayer::new(allowed))
        .add_service(health)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async {
                let _ = stop.await;
            },
        )
        .await
        .unwrap();
}

/// One health check on `sock`: "ok" or the status code's name.
async fn check(sock: &str) -> String {
    let sock = sock.to_string();
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    match h
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
    {
        Ok(_) => "ok".into(),
        Err(e) => format!("{:?}", e.code()),
    }
}

/// Runs this binary's `client` test as `uid` against `sock`.
fn as_uid(uid: u32, sock: &Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "client", "--nocapture", "--test-threads", "1"])
        .env("PEER_CHECK_CLIENT", sock)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        // The harness may print "test client ... " on the same line.
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.trim()))
        .unwrap_or_else(|| {
            panic!(
                "the client printed no result: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

/// The client half: does nothing unless run by [`as_uid`].
#[test]
fn client() {
    let Some(sock) = std::env::var_os("PEER_CHECK_CLIENT") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(check(&sock.to_string_lossy()));
    println!("RESULT {r}");
}

#[test]
fn only_root_and_allowed_uids_may_call() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: it runs a client as uid {NOBODY} (CI runs as root)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The other uid must reach the socket: the check, not the file mode,
    // is under test.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (allowed, want_nobody) in [(vec![], "PermissionDenied"), (vec![NOBODY], "ok")] {
        let sock = dir.path().join(format!("s{}.sock", allowed.len()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = rt.spawn({
            let sock = sock.clone();
            async move { serve(&sock, allowed, rx).await }
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            rt.block_on(check(&sock.to_string_lossy())),
            "ok",
            "root may call"
        );
        assert_eq!(as_uid(NOBODY, &sock), want_nobody, "uid {NOBODY}");
        let _ = tx.send(());
        rt.block_on(server).unwrap();
    }
}
