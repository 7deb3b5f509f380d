//! TLS settings: mutual TLS between nodes, optional TLS on the API port.
//!
//! # Node identity
//!
//! Every node holds a certificate issued by the cluster CA whose subject
//! alternative names include the DNS name `node-<id>` (see [`node_name`]);
//! `deploy/tls/make-certs.sh` makes such a CA and certificates. On the peer
//! port both sides present their certificates:
//! - the connecting side verifies that the accepting node's certificate
//!   names the node it meant to reach;
//! - the accepting side verifies the chain to the cluster CA and that the
//!   certificate names the node id the connection's Hello claims
//!   ([`cert_names_node`]); everything the connection carries is then
//!   attributed to that node, and the membership checks of the raft layer
//!   build on that attribution.
//!
//! A single-label name cannot be matched by a wildcard certificate, so a
//! `*.example` certificate from the same CA never passes for a node.
//!
//! On the API port TLS is optional. With a client CA, clients may present a
//! certificate; calls to the control service (`atomix.multiraft.v1.Node`)
//! require one that verifies, KV and Admin calls do not, unless every call
//! is to require one ([`ClientAuth::All`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("CA certificate {path}: {source}")]
    Ca {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(
        "certificate {path} does not name node {node} (it needs the DNS subject alternative name node-{node})"
    )]
    NotThisNode { path: PathBuf, node: u64 },
}

/// A CA bundle, a certificate chain and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The crypto provider every configuration uses (ring; chosen explicitly so
/// that no process-wide default has to be installed).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS name a node's certificate carries: `node-<id>`.
pub fn node_name(id: u64) -> ServerName<'static> {
    let name = DnsName::try_from(format!("node-{id}")).expect("node-<digits> is a valid DNS name");
    ServerName::DnsName(name)
}

/// Whether `cert` (already verified against the CA) names node `id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, id: u64) -> bool {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.verify_is_valid_for_subject_name(&node_name(id)).is_ok(),
        Err(_) => false,
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        source,
    })
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA certificate", path)? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Mutual TLS for the peer port: one configuration per direction, shared
/// by every clone and replaced as a whole by [`PeerTls::reload`] (new
/// connections use the new files; open ones keep their session).
#[derive(Clone)]
pub struct PeerTls {
    configs: Arc<RwLock<(Arc<ServerConfig>, Arc<ClientConfig>)>>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// Loads the files of node `node_id`, refusing a certificate that does
    /// not name that node (a misconfiguration every peer would refuse).
    pub fn load(files: &TlsFiles, node_id: u64) -> Result<PeerTls, TlsError> {
        Ok(PeerTls {
            configs: Arc::new(RwLock::new(Self::build(files, node_id)?)),
        })
    }

    /// Reads the files again; on any error the current configuration stays.
    pub fn reload(&self, files: &TlsFiles, node_id: u64) -> Result<(), TlsError> {
        let fresh = Self::build(files, node_id)?;
        *self.configs.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Accepting side: requires a client certificate from the cluster CA.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.configs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Connecting side: presents this node's certificate and verifies the
    /// peer's against the cluster CA and the peer's [`node_name`].
    pub fn client(&self) -> Arc<ClientConfig> {
        self.configs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    fn build(
        files: &TlsFiles,
        node_id: u64,
    ) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), TlsError> {
        let roots = read_roots(&files.ca)?;
        let chain = read_certs("certificate", &files.cert)?;
        let key = read_key(&files.key)?;
        if !cert_names_node(&chain[0], node_id) {
            return Err(TlsError::NotThisNode {
                path: files.cert.clone(),
                node: node_id,
            });
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(config_err)?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        // The accepting side of a peer connection never writes after the
        // handshake (connections are one-way), so it sends no tickets.
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        Ok((Arc::new(server), Arc::new(client)))
    }
}

/// Which API calls need a verified client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// None: no client CA.
    Off,
    /// The control service (Bootstrap, Join, Leave).
    Control,
    /// Every call; the TLS handshake itself requires a certificate.
    All,
}

/// TLS on the API port.
#[derive(Clone)]
pub struct ApiTls {
    server: Arc<RwLock<Arc<ServerConfig>>>,
    /// Which calls need a client certificate that verified against the
    /// client CA (fixed at start; a reload changes files, not the mode).
    pub client_auth: ClientAuth,
}

impl fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiTls")
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

impl ApiTls {
    /// Serves `cert`/`key`; with `client_ca`, verifies the certificates
    /// clients present, which calls need one depending on `all` (only
    /// with `all` does the handshake itself require one).
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        all: bool,
    ) -> Result<ApiTls, TlsError> {
        let (server, client_auth) = Self::build(cert, key, client_ca, all)?;
        Ok(ApiTls {
            server: Arc::new(RwLock::new(server)),
            client_auth,
        })
    }

    /// Reads the files again; on any error the current configuration stays.
    pub fn reload(
        &self,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<(), TlsError> {
        let all = self.client_auth == ClientAuth::All;
        let (fresh, _) = Self::build(cert, key, client_ca, all)?;
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The configuration new connections get.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.server
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn build(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        all: bool,
    ) -> Result<(Arc<ServerConfig>, ClientAuth), TlsError> {
        let chain = read_certs("certificate", cert)?;
        let key = read_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let (builder, client_auth) = match client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(read_roots(ca)?, provider());
                let (verifier, auth) = if all {
                    (verifier, ClientAuth::All)
                } else {
                    (verifier.allow_unauthenticated(), ClientAuth::Control)
                };
                let verifier = verifier.build().map_err(config_err)?;
                (builder.with_client_cert_verifier(verifier), auth)
            }
            None => (builder.with_no_client_auth(), ClientAuth::Off),
        };
        let mut server = builder.with_single_cert(chain, key).map_err(config_err)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(server), client_auth))
    }
}

/// Client side of the API port (CLI, bench): trusts `ca`, optionally
/// presents a client certificate.
pub fn api_client(
    ca: &Path,
    cert_key: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = read_roots(ca)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(config_err)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_webpki_verifier(verifier);
    let mut config = match cert_key {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs("certificate", cert)?, read_key(key)?)
            .map_err(config_err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Certificates for nodes 1 and 2 made by the deployment script.
    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tls/make-certs.sh");
        let out = std::process::Command::new("bash")
            .args([script, dir.path().to_str().unwrap(), "1", "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        dir
    }

    fn files(dir: &Path, cert: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{cert}.pem")),
            key: dir.join(format!("{cert}.key")),
        }
    }

    #[test]
    fn a_certificate_names_exactly_its_node() {
        let dir = certs();
        let one = read_certs("certificate", &dir.path().join("node-1.pem")).unwrap();
        assert!(cert_names_node(&one[0], 1));
        for other in [2, 11, 10, 0] {
            assert!(
                !cert_names_node(&one[0], other),
                "node-1 passed for {other}"
            );
        }
        let client = read_certs("certificate", &dir.path().join("client.pem")).unwrap();
        assert!(!cert_names_node(&client[0], 1));
        assert!(!cert_names_node(&CertificateDer::from(vec![0u8; 16]), 1));
    }

    #[test]
    fn a_node_loads_only_its_own_certificate() {
        let dir = certs();
        PeerTls::load(&files(dir.path(), "node-1"), 1).unwrap();
        let wrong = PeerTls::load(&files(dir.path(), "node-2"), 1).unwrap_err();
        assert!(
            matches!(wrong, TlsError::NotThisNode { node: 1, .. }),
            "{wrong}"
        );
        let mut missing = files(dir.path(), "node-1");
        missing.key = dir.path().join("absent.key");
        let err = PeerTls::load(&missing, 1).unwrap_err().to_string();
        assert!(err.contains("absent.key"), "{err}");
        let mut not_a_ca = files(dir.path(), "node-1");
        not_a_ca.ca = dir.path().join("node-1.key");
        assert!(PeerTls::load(&not_a_ca, 1).is_err());
    }

    #[test]
    fn api_settings_load_with_and_without_a_client_ca() {
        let dir = certs();
        let d = dir.path();
        let (cert, key) = (d.join("node-1.pem"), d.join("node-1.key"));
        let plain = ApiTls::load(&cert, &key, None, false).unwrap();
        assert_eq!(plain.client_auth, ClientAuth::Off);
        let ca = d.join("ca.pem");
        let control = ApiTls::load(&cert, &key, Some(&ca), false).unwrap();
        assert_eq!(control.client_auth, ClientAuth::Control);
        let all = ApiTls::load(&cert, &key, Some(&ca), true).unwrap();
        assert_eq!(all.client_auth, ClientAuth::All);
        api_client(&ca, Some((&d.join("client.pem"), &d.join("client.key")))).unwrap();
        api_client(&ca, None).unwrap();
    }
}
