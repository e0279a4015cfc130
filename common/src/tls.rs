//! The cluster's TLS material: a cluster CA, one certificate per node, and the rustls
//! configurations for mutual TLS between nodes (QUIC data plane and gRPC control plane).
//!
//! Every node certificate is valid for [`CLUSTER_SERVER_NAME`], `localhost`, `127.0.0.1` and
//! the node's own name. Nodes verify each other only against the cluster CA, so clients
//! connect with [`CLUSTER_SERVER_NAME`] as the server name whatever address they dial: every
//! holder of a CA-signed certificate is a cluster member, and addresses change across restarts.
//!
//! The crypto provider is always ring, passed explicitly, so that no process-wide default
//! provider has to be installed and aws-lc never gets linked.

use crate::config::TlsPaths;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The server name every node certificate carries and every node client asks for.
pub const CLUSTER_SERVER_NAME: &str = "warren.cluster";

/// An error building or loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or written.
    #[error("tls file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("tls file {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating tls material: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the material.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("tls client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The ring crypto provider, which every Warren TLS configuration uses.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    // The issuer is rebuilt from these fixed parameters plus the stored CA key, so they must
    // stay identical to the ones the CA certificate was made with.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Warren cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// Create (or reuse) a cluster CA under `dir` and one certificate and key per node name,
/// returning each node's [`TlsPaths`] in the order of `node_names`.
///
/// Files: `dir/ca.pem`, `dir/ca.key.pem`, `dir/<name>.pem`, `dir/<name>.key.pem`. An existing
/// CA is reused (so nodes created earlier keep trusting new ones); node certificates are
/// always reissued.
pub fn create_dev_cluster_tls(dir: &Path, node_names: &[&str]) -> Result<Vec<TlsPaths>, TlsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key.pem");
    let params = ca_params()?;
    let ca_key = if ca_cert_path.exists() && ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        rcgen::KeyPair::from_pem(&pem)?
    } else {
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        std::fs::write(&ca_cert_path, cert.pem()).map_err(io_err(&ca_cert_path))?;
        key
    };
    let issuer = rcgen::Issuer::new(params, ca_key);

    let mut out = Vec::with_capacity(node_names.len());
    for name in node_names {
        let mut sans = vec![
            CLUSTER_SERVER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        if !sans.iter().any(|s| s == name) {
            sans.push((*name).to_string());
        }
        let mut params = rcgen::CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key.pem"));
        std::fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
        write_private(&key_path, &key.serialize_pem())?;
        out.push(TlsPaths {
            ca_cert: ca_cert_path.clone(),
            cert: cert_path,
            key: key_path,
        });
    }
    Ok(out)
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Read the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn ca_roots(paths: &TlsPaths) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&paths.ca_cert)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A server configuration that presents this node's certificate and requires every client
/// to present a certificate signed by the cluster CA. The caller sets ALPN protocols.
pub fn server_config(paths: &TlsPaths) -> Result<ServerConfig, TlsError> {
    let provider = ring_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(ca_roots(paths)?), provider.clone())
            .build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(config)
}

/// A client configuration that trusts only the cluster CA and presents this node's
/// certificate. Connect with [`CLUSTER_SERVER_NAME`] as the server name.
pub fn client_config(paths: &TlsPaths) -> Result<ClientConfig, TlsError> {
    let config = ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(ca_roots(paths)?)
        .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dev_cluster_material_builds_server_and_client_configs() {
        let dir = tempfile::tempdir().unwrap();
        let paths = create_dev_cluster_tls(dir.path(), &["storage-1", "compute"]).unwrap();
        assert_eq!(paths.len(), 2);
        for p in &paths {
            server_config(p).unwrap();
            client_config(p).unwrap();
        }
        // A second call reuses the CA, so earlier certificates stay valid.
        let ca_before = std::fs::read(&paths[0].ca_cert).unwrap();
        let again = create_dev_cluster_tls(dir.path(), &["storage-2"]).unwrap();
        assert_eq!(std::fs::read(&again[0].ca_cert).unwrap(), ca_before);
    }

    #[test]
    fn a_missing_key_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = create_dev_cluster_tls(dir.path(), &["n"])
            .unwrap()
            .remove(0);
        paths.key = dir.path().join("nope.pem");
        let err = server_config(&paths).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
