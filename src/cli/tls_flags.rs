//! The TLS flags shared by `serve` and the client commands, and what they
//! set up: the node's peer and API TLS (reloadable on SIGHUP), or the
//! client commands' TLS.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::NodeConfig;

/// TLS files. `serve` uses them as the node's identity among its peers
/// (mutual TLS on the raft port); the client commands as the CA that the
/// node's API certificate must chain to and, for control calls, a client
/// certificate. `deploy/tls/make-certs.sh` makes a test set.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM). serve: the cluster CA every peer must chain
    /// to. Client commands: the CA of the nodes' API certificates (turns
    /// TLS on).
    #[arg(long, global = true, env = "MULTIRAFT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate chain (PEM). serve: this node's, naming DNS:node-ID.
    /// Client commands: a client certificate for control calls.
    #[arg(long, global = true, env = "MULTIRAFT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "MULTIRAFT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Reads the TLS files again (on SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<(), crate::tls::TlsError>>;

/// Fills in the node's TLS settings from the flags; returns what reloads
/// them.
pub fn node_tls(
    cfg: &mut NodeConfig,
    tls: &TlsArgs,
    api_tls: bool,
    api_client_ca: Option<PathBuf>,
    auth_all: bool,
) -> Result<Option<Reload>> {
    let files = match (&tls.tls_ca, &tls.tls_cert, &tls.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        _ => bail!("--tls-ca, --tls-cert and --tls-key go together"),
    };
    match &files {
        Some(files) => cfg.peer_tls = Some(crate::tls::PeerTls::load(files, cfg.node_id)?),
        None => tracing::warn!(
            "no --tls-ca/--tls-cert/--tls-key: peers talk in clear and anyone who reaches \
             the raft port can pose as a member; use TLS outside local development"
        ),
    }
    if auth_all && api_client_ca.is_none() {
        bail!("--api-auth all needs --api-client-ca");
    }
    if api_tls || api_client_ca.is_some() {
        let Some(files) = &files else {
            bail!("--api-tls and --api-client-ca need --tls-ca, --tls-cert and --tls-key");
        };
        cfg.api_tls = Some(crate::tls::ApiTls::load(
            &files.cert,
            &files.key,
            api_client_ca.as_deref(),
            auth_all,
        )?);
    }
    let Some(files) = files else {
        return Ok(None);
    };
    let (peer, api, id) = (cfg.peer_tls.clone(), cfg.api_tls.clone(), cfg.node_id);
    Ok(Some(Box::new(move || {
        if let Some(peer) = &peer {
            peer.reload(&files, id)?;
        }
        if let Some(api) = &api {
            api.reload(&files.cert, &files.key, api_client_ca.as_deref())?;
        }
        Ok(())
    })))
}

/// Makes the client commands' connections use TLS when --tls-ca is given.
pub fn client_tls(tls: &TlsArgs) -> Result<()> {
    let Some(ca) = &tls.tls_ca else {
        if tls.tls_cert.is_some() || tls.tls_key.is_some() {
            bail!("--tls-cert and --tls-key need --tls-ca");
        }
        return Ok(());
    };
    let cert_key = match (&tls.tls_cert, &tls.tls_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    crate::grpc::client::use_tls(crate::tls::api_client(ca, cert_key)?);
    Ok(())
}
