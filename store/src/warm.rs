//! A standby controller's warm copy of the store on etcd (issue 16: "the
//! others stand by with warm state"). A [`Mirror`] reads every key under
//! the prefix once, then follows an etcd watch from that revision, so that
//! a standby holds what the leader has written. When it is elected, the new
//! leader takes the copy once it has seen every change up to etcd's current
//! revision, and loads from it ([`crate::etcd::EtcdBackend::open_warm`])
//! instead of reading every key again while nodes wait.
use crate::{
    etcd::{etcd_error, page, prefix_end, PAGE},
    Result,
};
use etcd_client::{Client, EventType, WatchOptions};
use std::{collections::BTreeMap, time::Duration};
use tokio::sync::oneshot;

/// Every key under the prefix (without it) and its value, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copy {
    /// Keys and values.
    pub kvs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The etcd revision the copy is current at.
    pub revision: i64,
}

/// Asks the mirror for its copy once it is current at the revision given.
type Take = (i64, oneshot::Sender<Copy>);

/// Follows the store's keys in etcd on a task of the runtime it was started
/// on; stops when taken or dropped.
pub struct Mirror {
    take: Option<oneshot::Sender<Take>>,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    /// Starts following `prefix` (must be called inside a Tokio runtime).
    pub fn start(client: Client, prefix: &str) -> Mirror {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(follow(client, prefix.as_bytes().to_vec(), rx));
        Mirror {
            take: Some(tx),
            task,
        }
    }

    /// The copy, once it holds every change up to etcd's revision now; or
    /// `None` when it cannot get there within `timeout` (etcd out of reach,
    /// history compacted past it): the caller then reads etcd itself.
    pub async fn take(mut self, client: &Client, prefix: &str, timeout: Duration) -> Option<Copy> {
        let ask = async {
            // Any read answers with the store's current revision.
            let mut c = client.clone();
            let now = c
                .get(format!("{prefix}m/rev"), None)
                .await
                .ok()?
                .header()?
                .revision();
            let (tx, rx) = oneshot::channel();
            self.take.take()?.send((now, tx)).ok()?;
            rx.await.ok()
        };
        tokio::time::timeout(timeout, ask).await.ok().flatten()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads every key under `prefix` at one revision.
async fn load(client: &Client, prefix: &[u8]) -> Result<Copy> {
    let end = prefix_end(prefix);
    let mut from = prefix.to_vec();
    let mut copy = Copy::default();
    loop {
        let (kvs, more, at) = page(
            client.clone(),
            from.clone(),
            end.clone(),
            PAGE,
            copy.revision,
            false,
            prefix.len(),
        )
        .await?;
        if copy.revision == 0 {
            copy.revision = at;
        }
        let last = kvs.last().map(|(k, _)| k.clone());
        copy.kvs.extend(kvs);
        match last {
            Some(k) if more => {
                from = prefix.to_vec();
                from.extend_from_slice(&k);
                from.push(0);
            }
            _ => return Ok(copy),
        }
    }
}

/// The mirror's task: load, then apply the watch's events; load again
/// whenever the watch breaks or history was compacted past the copy.
async fn follow(client: Client, prefix: Vec<u8>, mut take: oneshot::Receiver<Take>) {
    let mut asked: Option<Take> = None;
    let mut wait = Duration::from_millis(100);
    loop {
        let mut copy = match load(&client, &prefix).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "warm copy: cannot read etcd");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        tracing::debug!(
            keys = copy.kvs.len(),
            revision = copy.revision,
            "warm copy loaded"
        );
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(copy.revision + 1);
        let mut c = client.clone();
        let mut stream = match c.watch(prefix.clone(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %etcd_error(&e), "warm copy: cannot watch etcd");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        wait = Duration::from_millis(100);
        // While asked: etcd confirms the revision a synced watch has reached
        // only when asked to, and ignores the request while it is still
        // replaying history, so ask again until it answers.
        let mut progress = tokio::time::interval(Duration::from_millis(50));
        loop {
            if let Some((want, _)) = &asked {
                if copy.revision >= *want {
                    if let Some((_, tx)) = asked.take() {
                        let _ = tx.send(std::mem::take(&mut copy));
                    }
                    return;
                }
            }
            let msg = tokio::select! {
                t = &mut take, if asked.is_none() => {
                    match t {
                        Ok(t) => asked = Some(t),
                        Err(_) => return,
                    }
                    continue;
                }
                _ = progress.tick(), if asked.is_some() => {
                    let _ = stream.request_progress().await;
                    continue;
                }
                m = stream.message() => m,
            };
            let r = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            if r.canceled() || r.compact_revision() > 0 {
                break;
            }
            if r.events().is_empty() {
                // A progress report (not the watch's creation, which comes
                // before the history it replays): every event up to its
                // header's revision has been delivered.
                if !r.created() {
                    if let Some(h) = r.header() {
                        copy.revision = copy.revision.max(h.revision());
                    }
                }
                continue;
            }
            for ev in r.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(key) = kv.key().get(prefix.len()..) else {
                    continue;
                };
                match ev.event_type() {
                    EventType::Put => {
                        copy.kvs.insert(key.to_vec(), kv.value().to_vec());
                    }
                    EventType::Delete => {
                        copy.kvs.remove(key);
                    }
                }
                copy.revision = copy.revision.max(kv.mod_revision());
            }
        }
        tracing::info!("warm copy: the etcd watch broke; reading the store again");
        if asked.as_ref().is_some_and(|(_, tx)| tx.is_closed()) {
            return;
        }
    }
}
