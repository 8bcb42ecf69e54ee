//! etcd v3 as the store's backend (issue 16), and the controllers' leader
//! election with fencing.
//!
//! Key layout, under a prefix (default `/tabby/`): the store's keys as on
//! sled (`m/rev`, `m/id`, `m/intent`, `m/epochs`, `p/<pool>`, `b/<block>`,
//! `a/<address>`, `r/<address>`, `h/<handle>`, `n/<node>`, `c/ipam`,
//! `c/bgp`), and `m/leader`: the leading controller's address, on its lease.
//!
//! A group commit is one etcd transaction, guarded by the leader's lease:
//! it lands only while `m/leader` is still held on that lease, so a deposed
//! leader's writes fail ([`StoreError::Fenced`]) and nothing of them lands.
//! etcd commits a transaction through its consensus before answering, so a
//! batch is durable once [`Backend::sync`] returns.
//!
//! The client is async; the store is called from plain threads (the IPAM
//! owner's). Each call runs on a small runtime of the backend's own and the
//! caller waits for it.
use crate::{
    backend::{Put, Visit},
    Backend, Result, StoreError,
};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use std::{collections::BTreeMap, future::Future, path::PathBuf, sync::Mutex, time::Duration};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tabby/";

/// The leader's key, under the prefix.
pub const LEADER_KEY: &[u8] = b"m/leader";

/// A page of a range read: the keys (without the prefix) and values, whether
/// more follow, and the etcd revision it was read at.
pub(crate) type Page = (Vec<(Vec<u8>, Vec<u8>)>, bool, i64);

/// How long a group commit keeps trying while etcd does not answer.
const RETRY_FOR: Duration = Duration::from_secs(8);

/// Keys read per request when scanning.
pub(crate) const PAGE: i64 = 4096;

/// TLS to etcd: the CA that signed its certificates, and our client
/// certificate if it asks for one.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA bundle (PEM).
    pub ca: PathBuf,
    /// Client certificate and key (PEM), when etcd requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http(s)://host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix (ends with `/`).
    pub prefix: String,
    /// TLS, if the endpoints are https.
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    /// Connects (lazily: members may come and go).
    pub async fn connect(&self) -> Result<Client> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(t) = &self.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| StoreError::Etcd(format!("{}: {e}", p.display())))
            };
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?));
            if let Some((c, k)) = &t.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
            }
            o = o.with_tls(tls);
        }
        Client::connect(&self.endpoints, Some(o))
            .await
            .map_err(|e| etcd_error(&e))
    }
}

/// An etcd error in an operator's words.
pub(crate) fn etcd_error(e: &etcd_client::Error) -> StoreError {
    let s = e.to_string();
    if s.contains("too many operations in txn request") {
        StoreError::Etcd(format!(
            "{s}: start etcd with a larger --max-txn-ops (tabby writes a group commit as one transaction; 10000 is ample)"
        ))
    } else {
        StoreError::Etcd(s)
    }
}

/// The key just past every key starting with `k` (etcd's range end for a
/// prefix).
pub(crate) fn prefix_end(k: &[u8]) -> Vec<u8> {
    let mut end = k.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// The store's keys in etcd.
pub struct EtcdBackend {
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: Vec<u8>,
    /// Batches applied and not yet sent (one transaction at the next sync).
    pending: Mutex<Vec<Put>>,
    /// The leader's lease that every transaction must find on `m/leader`.
    fence: Option<i64>,
    /// A standby's warm copy ([`crate::warm`]): reads are served from it
    /// (and writes applied to it: the fence's holder is the only writer)
    /// until the store has loaded, then it is dropped.
    warm: Mutex<Option<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl EtcdBackend {
    /// Connects to `cfg`'s etcd. With `fence` (the leader's lease), every
    /// write is guarded by it.
    pub fn open(cfg: &EtcdConfig, fence: Option<i64>) -> Result<EtcdBackend> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd(format!("starting the etcd client's runtime: {e}")))?;
        let c = cfg.clone();
        let client = on(&rt, async move { c.connect().await })?;
        Ok(EtcdBackend {
            rt: Some(rt),
            client,
            prefix: cfg.prefix.as_bytes().to_vec(),
            pending: Mutex::new(Vec::new()),
            fence,
            warm: Mutex::new(None),
        })
    }

    /// As [`EtcdBackend::open`], reading from `copy` (a standby's warm
    /// copy, current at etcd's revision when this one was elected) until
    /// the store has loaded.
    pub fn open_warm(
        cfg: &EtcdConfig,
        fence: Option<i64>,
        copy: crate::warm::Copy,
    ) -> Result<EtcdBackend> {
        let b = Self::open(cfg, fence)?;
        *b.warm_copy() = Some(copy.kvs);
        Ok(b)
    }

    fn warm_copy(&self) -> std::sync::MutexGuard<'_, Option<BTreeMap<Vec<u8>, Vec<u8>>>> {
        self.warm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn key(&self, k: &[u8]) -> Vec<u8> {
        let mut v = self.prefix.clone();
        v.extend_from_slice(k);
        v
    }

    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        on(self.rt.as_ref().expect("runtime until drop"), f)
    }

    /// Keys `[lo, hi)` of the store's space (`hi` empty: to its end), at most
    /// `limit`, with their values.
    fn range(
        &self,
        lo: &[u8],
        hi: Option<&[u8]>,
        limit: i64,
        revision: i64,
        keys_only: bool,
    ) -> Result<Page> {
        let from = self.key(lo);
        let end = match hi {
            Some(h) => self.key(h),
            None => prefix_end(&self.prefix),
        };
        let c = self.client.clone();
        let plen = self.prefix.len();
        self.run(async move { page(c, from, end, limit, revision, keys_only, plen).await })
    }
}

/// Keys `[from, end)`, at most `limit`, at `revision` (0: the newest), with
/// `strip` bytes of prefix removed from each key.
pub(crate) async fn page(
    mut c: Client,
    from: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    revision: i64,
    keys_only: bool,
    strip: usize,
) -> Result<Page> {
    let mut o = GetOptions::new()
        .with_range(end)
        .with_limit(limit)
        .with_revision(revision);
    if keys_only {
        o = o.with_keys_only();
    }
    let r = c.get(from, Some(o)).await.map_err(|e| etcd_error(&e))?;
    let rev = r.header().map_or(0, |h| h.revision());
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| (kv.key()[strip..].to_vec(), kv.value().to_vec()))
        .collect();
    Ok((kvs, r.more(), rev))
}

/// Runs `f` on `rt` and waits for it, from any thread (also one that runs
/// another runtime).
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .expect("the etcd client's runtime runs until the backend is dropped")
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        // Never blocks: a store may be dropped inside an async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Backend for EtcdBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(w) = &*self.warm_copy() {
            return Ok(w.get(key).cloned());
        }
        let k = self.key(key);
        let mut c = self.client.clone();
        self.run(async move {
            let r = c.get(k, None).await.map_err(|e| etcd_error(&e))?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn apply(&self, batch: Vec<Put>) -> Result<()> {
        if let Some(w) = &mut *self.warm_copy() {
            for (k, v) in &batch {
                match v {
                    Some(v) => w.insert(k.clone(), v.clone()),
                    None => w.remove(k),
                };
            }
        }
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(batch);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let pending = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if pending.is_empty() {
            return Ok(());
        }
        // etcd refuses a key twice in one transaction: the last write wins.
        let merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = pending.into_iter().collect();
        let ops: Vec<TxnOp> = merged
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(self.key(&k), v, None),
                None => TxnOp::delete(self.key(&k), None),
            })
            .collect();
        let mut txn = Txn::new();
        if let Some(lease) = self.fence {
            txn = txn.when([Compare::lease(
                self.key(LEADER_KEY),
                CompareOp::Equal,
                lease,
            )]);
        }
        let txn = txn.and_then(ops);
        let mut c = self.client.clone();
        let fenced = self.fence.is_some();
        self.run(async move {
            // A transaction whose answer was lost (a member died, the etcd
            // leader changed) is sent again: it puts absolute values, and
            // only the fence's holder writes, so a second landing changes
            // nothing. Bounded, so that a lost quorum is an error soon.
            let deadline = tokio::time::Instant::now() + RETRY_FOR;
            let mut wait = Duration::from_millis(50);
            loop {
                match c.txn(txn.clone()).await {
                    Ok(r) if fenced && !r.succeeded() => {
                        return Err(StoreError::Fenced(
                            "another controller leads (our lease no longer holds the leader key); nothing was written".into(),
                        ))
                    }
                    Ok(_) => return Ok(()),
                    Err(e) if tokio::time::Instant::now() + wait < deadline => {
                        tracing::warn!(error = %e, "etcd transaction failed; sending it again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => return Err(etcd_error(&e)),
                }
            }
        })
    }

    fn scan(&self, prefix: &[u8], f: Visit<'_>) -> Result<()> {
        if let Some(w) = &*self.warm_copy() {
            for (k, v) in w.range(prefix.to_vec()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                f(k, v)?;
            }
            return Ok(());
        }
        // An empty prefix: the whole store space.
        let end = (!prefix.is_empty()).then(|| prefix_end(prefix));
        let mut from = prefix.to_vec();
        // Every page at the revision of the first: one consistent picture.
        let mut rev = 0;
        loop {
            let (kvs, more, at) = self.range(&from, end.as_deref(), PAGE, rev, false)?;
            if rev == 0 {
                rev = at;
            }
            for (k, v) in &kvs {
                f(k, v)?;
            }
            match kvs.last() {
                Some((k, _)) if more => {
                    from.clone_from(k);
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    fn first_key_outside(&self, known: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(w) = &*self.warm_copy() {
            return Ok(w
                .keys()
                .find(|k| !(k.len() >= 2 && known.contains(&k[0]) && k[1] == b'/'))
                .cloned());
        }
        let mut lo: Vec<u8> = Vec::new();
        for p in known.iter().map(Some).chain([None]) {
            let hi = p.map(|p| vec![*p, b'/']);
            let (kvs, _, _) = self.range(&lo, hi.as_deref(), 1, 0, true)?;
            if let Some((k, _)) = kvs.into_iter().next() {
                return Ok(Some(k));
            }
            if let Some(p) = p {
                lo = vec![*p, b'/' + 1];
            }
        }
        Ok(None)
    }

    fn loaded(&self) {
        if let Some(w) = self.warm_copy().take() {
            tracing::info!(
                keys = w.len(),
                "store loaded from the warm copy; reading etcd from now on"
            );
        }
    }
}

/// Pause between attempts to reopen a broken lease keep-alive stream.
const KEEPALIVE_RETRY: Duration = Duration::from_millis(100);

/// What a campaign for leadership gives: the lease that holds the leader
/// key (the fence of every write), and word when it is lost.
pub struct Leadership {
    /// The lease on `m/leader`.
    pub lease: i64,
    /// Turns true when the lease could not be kept alive: from then on every
    /// write fails, and the controller must step down.
    pub lost: tokio::sync::watch::Receiver<bool>,
}

/// Campaigns for leadership under `prefix` as `me` (the address others
/// should be sent to) with a lease of `ttl` seconds. Returns once elected;
/// meanwhile `leader` says who leads. The lease is kept alive from the start
/// (every `ttl`/3); once it cannot be, `lost` turns true.
pub async fn campaign(
    client: &Client,
    prefix: &str,
    me: &str,
    ttl: i64,
    leader: &tokio::sync::watch::Sender<Option<String>>,
) -> Result<Leadership> {
    let mut c = client.clone();
    let lease = c
        .lease_grant(ttl, None)
        .await
        .map_err(|e| etcd_error(&e))?
        .id();
    let (lost_tx, lost) = tokio::sync::watch::channel(false);
    {
        let mut c = client.clone();
        let ttl_d = Duration::from_secs(ttl.max(1) as u64);
        let every = ttl_d / 3;
        tokio::spawn(async move {
            // A keep-alive stream breaks when the etcd member it runs on goes
            // away, but the lease lives on in the cluster: open another (the
            // client picks a live member) until the lease could have run
            // out, with a margin of one interval so that this controller
            // steps down before a successor can be elected.
            let mut deadline = tokio::time::Instant::now() + ttl_d - every;
            let mut first = true;
            'stream: while tokio::time::Instant::now() < deadline {
                if !std::mem::take(&mut first) {
                    tracing::warn!(
                        lease,
                        "etcd lease keep-alive stream broken: opening another"
                    );
                    tokio::time::sleep(KEEPALIVE_RETRY).await;
                }
                let (mut keeper, mut stream) =
                    match tokio::time::timeout_at(deadline, c.lease_keep_alive(lease)).await {
                        Ok(Ok(k)) => k,
                        Ok(Err(_)) => continue,
                        Err(_) => break,
                    };
                loop {
                    if keeper.keep_alive().await.is_err() {
                        continue 'stream;
                    }
                    // Half an interval, so that a silent member leaves time
                    // to try another before the deadline.
                    match tokio::time::timeout(every / 2, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            deadline = tokio::time::Instant::now()
                                + Duration::from_secs(r.ttl() as u64).saturating_sub(every);
                        }
                        // The lease is gone: nothing can bring it back.
                        Ok(Ok(Some(_))) => break 'stream,
                        _ => continue 'stream,
                    }
                    tokio::time::sleep(every).await;
                }
            }
            tracing::error!(
                lease,
                "the etcd lease could not be kept alive: leadership lost"
            );
            let _ = lost_tx.send(true);
        });
    }
    let key = format!("{prefix}{}", String::from_utf8_lossy(LEADER_KEY)).into_bytes();
    loop {
        if *lost.borrow() {
            return Err(StoreError::Etcd(
                "the campaign's lease expired (etcd unreachable?)".into(),
            ));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                me,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        match c.txn(txn).await {
            Ok(r) if r.succeeded() => {
                let _ = leader.send(Some(me.to_string()));
                return Ok(Leadership { lease, lost });
            }
            Ok(r) => {
                let now = r.op_responses().into_iter().find_map(|o| match o {
                    etcd_client::TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                });
                leader.send_if_modified(|l| {
                    let changed = *l != now;
                    *l = now;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "etcd: campaign step failed; trying again"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader's address, if one leads.
pub async fn leader(client: &Client, prefix: &str) -> Result<Option<String>> {
    let key = format!("{prefix}{}", String::from_utf8_lossy(LEADER_KEY));
    let r = client
        .clone()
        .get(key, None)
        .await
        .map_err(|e| etcd_error(&e))?;
    Ok(r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/tabby/"), b"/tabby0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
