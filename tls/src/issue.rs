//! A small CA for tabby: the CA itself, the controller's server certificate
//! and the node and admin client certificates, as PEM files in one
//! directory. Keys are ECDSA P-256 and written with mode 0600.
use crate::{identity::check_name, Error, Identity, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};
use time::{Duration, OffsetDateTime};

/// The CA's certificate file in a certificates directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's key file.
pub const CA_KEY: &str = "ca-key.pem";

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not valid before this.
    pub not_before: OffsetDateTime,
    /// Not valid after this.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From five minutes ago (clocks differ a little) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days.into()),
        }
    }
}

/// A certificate and key written by [`issue`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// What to issue.
#[derive(Debug, Clone)]
pub enum Kind {
    /// The CA (`ca.pem`, `ca-key.pem`). Refused if the directory has one.
    Ca,
    /// The controller's certificate (`server.pem`), for these DNS names and
    /// IP addresses.
    Server(Vec<String>),
    /// A node's or an operator's client certificate (`node-<name>.pem`,
    /// `admin-<name>.pem`).
    Client(Identity),
}

/// Issues `kind` into `dir` (created if missing). Certificates other than
/// the CA are signed by the CA in `dir`. Existing files of the same name are
/// replaced atomically (rotation); the CA is never replaced.
pub fn issue(dir: &Path, kind: &Kind, validity: Validity) -> Result<Issued> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })?;
    let key = KeyPair::generate().map_err(rc)?;
    let (stem, params) = match kind {
        Kind::Ca => {
            if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
                return Err(Error::Invalid(format!(
                    "{} already has a CA; remove {CA_CERT} and {CA_KEY} to make a new one",
                    dir.display()
                )));
            }
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.distinguished_name = dn("tabby CA");
            ("ca".to_string(), p)
        }
        Kind::Server(sans) => {
            if sans.is_empty() {
                return Err(Error::Invalid(
                    "a server certificate needs at least one --san (DNS name or IP address)".into(),
                ));
            }
            let mut p = CertificateParams::default();
            p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_>>()?;
            p.distinguished_name = dn("tabby-controller");
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            ("server".to_string(), p)
        }
        Kind::Client(id) => {
            let (Identity::Node(n) | Identity::Admin(n)) = id;
            check_name(n).map_err(Error::Invalid)?;
            let mut p = CertificateParams::default();
            let uri = id.uri().try_into().map_err(rc)?;
            p.subject_alt_names = vec![SanType::URI(uri)];
            p.distinguished_name = dn(&id.uri());
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            (stem_of(id), p)
        }
    };
    let mut params = params;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = match kind {
        Kind::Ca => params.self_signed(&key).map_err(rc)?,
        _ => {
            let ca_pem = read(&dir.join(CA_CERT))?;
            let ca_key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?).map_err(rc)?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(rc)?;
            params.signed_by(&key, &issuer).map_err(rc)?
        }
    };
    let out = Issued {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    // The key first: a reloading reader that sees the new certificate can
    // then load its key too.
    write_atomic(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

fn stem_of(id: &Identity) -> String {
    match id {
        Identity::Node(n) => format!("node-{n}"),
        Identity::Admin(n) => format!("admin-{n}"),
    }
}

fn rc(e: rcgen::Error) -> Error {
    Error::Issue(e.to_string())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}

fn san(s: &str) -> Result<SanType> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns_ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !dns_ok {
        return Err(Error::Invalid(format!(
            "--san {s:?} is neither an IP address nor a DNS name"
        )));
    }
    Ok(SanType::DnsName(s.to_string().try_into().map_err(rc)?))
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|source| Error::Io {
        path: p.into(),
        source,
    })
}

/// Writes `data` to a new file beside `path` with `mode`, then renames it
/// over `path`: a reader sees the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The files [`issue`] writes for a client identity, with `dir`'s CA: what a
/// node or an operator connects with.
pub fn client_files(dir: &Path, id: &Identity) -> crate::material::Files {
    let stem = stem_of(id);
    crate::material::Files {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca: dir.join(CA_CERT),
    }
}

/// The files [`issue`] writes for the controller, with `dir`'s CA: what the
/// controller serves with.
pub fn server_files(dir: &Path) -> crate::material::Files {
    crate::material::Files {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        ca: dir.join(CA_CERT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issues_a_chain_with_private_keys_and_identities() {
        let d = tempfile::tempdir().unwrap();
        let v = Validity::days(1);
        let ca = issue(d.path(), &Kind::Ca, v).unwrap();
        assert!(
            issue(d.path(), &Kind::Ca, v).is_err(),
            "a CA is never replaced"
        );
        let srv = issue(
            d.path(),
            &Kind::Server(vec!["127.0.0.1".into(), "ctl.local".into()]),
            v,
        )
        .unwrap();
        let node = issue(d.path(), &Kind::Client(Identity::Node("n1".into())), v).unwrap();
        for k in [&ca.key, &srv.key, &node.key] {
            let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        let pem = std::fs::read(&node.cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der).unwrap(),
            Some(Identity::Node("n1".into()))
        );
        assert!(issue(d.path(), &Kind::Server(vec!["bad name".into()]), v).is_err());
        assert!(issue(d.path(), &Kind::Client(Identity::Node("Bad".into())), v).is_err());
    }
    use rustls::pki_types::pem::PemObject;
}
