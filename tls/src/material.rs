//! PEM files into rustls configs, and keeping those configs current.
use crate::{provider, Error, Result};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock, Weak},
    time::Duration,
};

/// The files a daemon serves or connects with.
#[derive(Debug, Clone)]
pub struct Files {
    /// Its certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) that verify the other side.
    pub ca: PathBuf,
}

fn read_all(paths: &[&Path]) -> Result<Vec<Vec<u8>>> {
    paths.iter().map(|p| read(p)).collect()
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|source| Error::Io {
        path: p.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let v = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.into(),
            what: format!("bad certificate PEM: {e}"),
        })?;
    if v.is_empty() {
        return Err(Error::Pem {
            path: path.into(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(v)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        path: path.into(),
        what: format!("no usable private key: {e}"),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>> {
    let mut r = RootCertStore::empty();
    for c in certs(path, pem)? {
        r.add(c).map_err(|e| Error::Pem {
            path: path.into(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(r))
}

/// Only HTTP/2: gRPC clients (grpc-go among them) insist on ALPN `h2`.
const ALPN_H2: &[u8] = b"h2";

/// What the controller serves with: its certificate, and the CA its clients'
/// certificates must chain to. A client without a certificate may still
/// connect (health and reflection need none); what it may call is decided
/// per call from [`PeerInfo`](crate::PeerInfo). A certificate that does not
/// verify (another CA, expired, not yet valid) fails the handshake.
#[derive(Debug, Clone)]
pub struct ServerMaterial(pub Files);

/// What a node connects with: its certificate, and the CA the controller's
/// certificate must chain to.
#[derive(Debug, Clone)]
pub struct ClientMaterial(pub Files);

/// A client that presents no certificate and verifies the controller
/// against a CA: enough for health checks and reflection.
#[derive(Debug, Clone)]
pub struct AnonymousClient(pub PathBuf);

/// Material that can be built into a rustls config.
pub trait Build: Send + Sync + 'static {
    /// The rustls config it builds.
    type Config: Send + Sync + 'static;
    /// The files it reads, in the order [`Build::build`] gets them.
    fn paths(&self) -> Vec<&Path>;
    /// Builds the config from the files' contents.
    fn build(&self, pem: &[Vec<u8>]) -> Result<Self::Config>;
}

fn three(pem: &[Vec<u8>]) -> Result<(&[u8], &[u8], &[u8])> {
    match pem {
        [c, k, ca] => Ok((c, k, ca)),
        _ => Err(Error::Invalid("want a certificate, a key and a CA".into())),
    }
}

impl Build for ServerMaterial {
    type Config = ServerConfig;
    fn paths(&self) -> Vec<&Path> {
        vec![&self.0.cert, &self.0.key, &self.0.ca]
    }
    fn build(&self, pem: &[Vec<u8>]) -> Result<ServerConfig> {
        let (c, k, ca) = three(pem)?;
        let f = &self.0;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&f.ca, ca)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Verifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&f.cert, c)?, key(&f.key, k)?)?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No session resumption: a resumed session skips verifying the
        // client's certificate, so an identity whose certificate expired
        // or whose CA was replaced could go on connecting. Connections are
        // long-lived; a full handshake per connection costs little.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }
}

impl Build for AnonymousClient {
    type Config = ClientConfig;
    fn paths(&self) -> Vec<&Path> {
        vec![&self.0]
    }
    fn build(&self, pem: &[Vec<u8>]) -> Result<ClientConfig> {
        let ca = pem.first().map(Vec::as_slice).unwrap_or_default();
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.0, ca)?)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(cfg)
    }
}

impl Build for ClientMaterial {
    type Config = ClientConfig;
    fn paths(&self) -> Vec<&Path> {
        vec![&self.0.cert, &self.0.key, &self.0.ca]
    }
    fn build(&self, pem: &[Vec<u8>]) -> Result<ClientConfig> {
        let (c, k, ca) = three(pem)?;
        let f = &self.0;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&f.ca, ca)?)
            .with_client_auth_cert(certs(&f.cert, c)?, key(&f.key, k)?)?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(cfg)
    }
}

/// A built config and the file contents it was built from.
type Loaded<C> = (Arc<C>, Vec<Vec<u8>>);

struct Shared<M: Build> {
    material: M,
    current: RwLock<Loaded<M::Config>>,
}

/// A rustls config that follows its files: a watcher thread re-reads them
/// every `interval` and, when their bytes changed and they build, swaps in
/// the new config. Connections made after that use it; open ones keep what
/// they were made with. Files that do not build (e.g. the certificate
/// written, its key not yet) are logged and the old config stays.
pub struct Reloading<M: Build>(Arc<Shared<M>>);

impl<M: Build> Clone for Reloading<M> {
    fn clone(&self) -> Self {
        Reloading(self.0.clone())
    }
}

impl<M: Build> Reloading<M> {
    /// Loads the material (an error if it does not build) and starts the
    /// watcher thread, which ends once every handle is dropped.
    pub fn start(material: M, interval: Duration) -> Result<Self> {
        let pem = read_all(&material.paths())?;
        let cfg = Arc::new(material.build(&pem)?);
        let me = Reloading(Arc::new(Shared {
            material,
            current: RwLock::new((cfg, pem)),
        }));
        let weak = Arc::downgrade(&me.0);
        std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || watch(weak, interval))
            .map_err(|source| Error::Io {
                path: "tls-reload thread".into(),
                source,
            })?;
        Ok(me)
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<M::Config> {
        match self.0.current.read() {
            Ok(g) => g.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// Re-reads the files now; true if a new config was swapped in.
    pub fn reload(&self) -> Result<bool> {
        reload(&self.0)
    }
}

fn reload<M: Build>(s: &Shared<M>) -> Result<bool> {
    let pem = read_all(&s.material.paths())?;
    let same = match s.current.read() {
        Ok(g) => g.1 == pem,
        Err(p) => p.into_inner().1 == pem,
    };
    if same {
        return Ok(false);
    }
    let cfg = Arc::new(s.material.build(&pem)?);
    let mut g = s.current.write().unwrap_or_else(|p| p.into_inner());
    *g = (cfg, pem);
    Ok(true)
}

fn watch<M: Build>(weak: Weak<Shared<M>>, interval: Duration) {
    // The last failure, logged once until it changes.
    let mut last_err = String::new();
    loop {
        std::thread::sleep(interval);
        let Some(s) = weak.upgrade() else { return };
        match reload(&s) {
            Ok(true) => {
                last_err.clear();
                tracing::info!(files = ?s.material.paths(), "TLS material reloaded; new connections use it");
            }
            Ok(false) => last_err.clear(),
            Err(e) => {
                let msg = e.to_string();
                if msg != last_err {
                    tracing::warn!(error = %msg, "TLS material changed but does not load; keeping the previous one");
                    last_err = msg;
                }
            }
        }
    }
}

/// The tabby identity the first certificate in a PEM file names.
pub fn identity_of(cert: &Path) -> Result<Option<crate::Identity>> {
    let pem = read(cert)?;
    let leaf = certs(cert, &pem)?.remove(0);
    crate::Identity::from_cert_der(&leaf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{client_files, issue, Kind, Validity};
    use crate::Identity;

    /// A changed certificate is swapped in; files that do not load leave the
    /// previous config in place until they do.
    #[test]
    fn reloads_changed_files_and_keeps_the_old_config_on_bad_ones() {
        let d = tempfile::tempdir().unwrap();
        let id = Identity::Node("n1".into());
        issue(d.path(), &Kind::Ca, Validity::days(1)).unwrap();
        issue(d.path(), &Kind::Client(id.clone()), Validity::days(1)).unwrap();
        let files = client_files(d.path(), &id);
        let r = Reloading::start(ClientMaterial(files.clone()), Duration::from_secs(3600)).unwrap();
        let first = r.current();
        assert!(!r.reload().unwrap(), "unchanged files change nothing");
        assert!(Arc::ptr_eq(&first, &r.current()));

        issue(d.path(), &Kind::Client(id.clone()), Validity::days(2)).unwrap();
        assert!(r.reload().unwrap(), "a new certificate is loaded");
        let second = r.current();
        assert!(!Arc::ptr_eq(&first, &second));

        // A key that does not match the certificate: refused, old config kept.
        let other = tempfile::tempdir().unwrap();
        issue(other.path(), &Kind::Ca, Validity::days(1)).unwrap();
        std::fs::copy(other.path().join(crate::issue::CA_KEY), &files.key).unwrap();
        assert!(r.reload().is_err());
        assert!(Arc::ptr_eq(&second, &r.current()));
        std::fs::write(&files.cert, b"not PEM").unwrap();
        assert!(r.reload().is_err());
        assert!(Arc::ptr_eq(&second, &r.current()));
    }

    #[test]
    fn missing_or_empty_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let f = Files {
            cert: d.path().join("nope.pem"),
            key: d.path().join("nope-key.pem"),
            ca: d.path().join("ca.pem"),
        };
        let e = Reloading::start(ServerMaterial(f.clone()), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        for p in [&f.cert, &f.key, &f.ca] {
            std::fs::write(p, b"").unwrap();
        }
        let e = Reloading::start(ServerMaterial(f), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
