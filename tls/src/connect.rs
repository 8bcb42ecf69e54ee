//! The client side: a connector for tonic's `Endpoint` that makes each new
//! connection with the newest material.
use crate::{material::Build, Error, Reloading, Result};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tonic::transport::Uri;

/// Connects TCP to the URI's host and port, then TLS, verifying the server
/// against `server_name`. Use with `Endpoint::connect_with_connector*` on an
/// `http://host:port` endpoint.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
}

impl Connector {
    /// `server_name` is what the controller's certificate must name: a DNS
    /// name or an IP address.
    pub fn new<M: Build<Config = ClientConfig>>(
        tls: Reloading<M>,
        server_name: &str,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| Error::Invalid(format!("TLS server name {server_name:?}: {e}")))?;
        Ok(Connector {
            tls: Arc::new(move || tls.current()),
            server_name,
            connect_timeout,
        })
    }

    /// The same client material, verifying the server against another name
    /// (one controller replica of several, each with its own address).
    pub fn with_server_name(&self, server_name: &str) -> Result<Self> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| Error::Invalid(format!("TLS server name {server_name:?}: {e}")))?;
        Ok(Connector {
            tls: self.tls.clone(),
            server_name: name,
            connect_timeout: self.connect_timeout,
        })
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = TlsConnector::from((self.tls)());
        let (name, timeout) = (self.server_name.clone(), self.connect_timeout);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI has no host"))?;
            // `[::1]` in a URI is `::1` to connect to.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                connector.connect(name, tcp).await
            };
            let tls = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))??;
            Ok(TokioIo::new(tls))
        })
    }
}
