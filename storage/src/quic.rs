//! QUIC endpoints for the data plane: mutual TLS from the cluster CA, datacenter-sized
//! windows, and keep-alives short enough to notice a dead peer within seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warren_common::config::TlsPaths;
use warren_common::tls;
use warren_proto::internal::data::ALPN;

use crate::StorageError;

fn tls_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Invalid(format!("tls: {e}"))
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // A peer silent this long is treated as gone; its requests fail and are retried
    // elsewhere.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(5)).expect("5s is a valid idle timeout"),
    ));
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
    Arc::new(t)
}

/// A server endpoint bound to `addr`.
pub fn server_endpoint(
    paths: &TlsPaths,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, StorageError> {
    let mut crypto = tls::server_config(paths).map_err(tls_err)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(quinn::Endpoint::server(config, addr)?)
}

/// A client endpoint presenting this node's certificate.
pub fn client_endpoint(paths: &TlsPaths) -> Result<quinn::Endpoint, StorageError> {
    let mut crypto = tls::client_config(paths).map_err(tls_err)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
