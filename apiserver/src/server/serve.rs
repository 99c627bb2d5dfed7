//! The accept loop and each connection's life: counted against the connection limits,
//! given a deadline to speak, then served over HTTP/1 or HTTP/2 (with TLS when configured),
//! and shut down gracefully.
//!
//! A connection that has not sent a byte costs one small task and nothing of hyper: the
//! task that serves it is spawned only once it speaks, so a flood of silent connections
//! holds little memory while it lasts and leaves little behind.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tower_http::add_extension::AddExtension;

use super::limits::{ConnectionLimits, Ticket};
use super::HEADER_READ_TIMEOUT;

/// How long a TLS client has to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connections get to finish what they are doing at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connection-level timeouts: headers must arrive within `HEADER_READ_TIMEOUT` (HTTP/1), and
/// an HTTP/2 peer that stops answering pings is dropped.
fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open connections finish
/// for a few seconds.
pub async fn serve(
    listener: std::net::TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Arc<ConnectionLimits>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let builder = Arc::new(builder());
    let (stop, stopping) = watch::channel(false);
    // Every connection task holds a sender; when all are gone, every connection ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // wait a moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let ticket = limits.admit(peer.ip());
        let deadline = limits.first_request_deadline(&ticket);
        let app = app.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let stopping = stopping.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, or silent past its deadline: dropped here, and the ticket with it.
                _ => return,
            }
            tokio::spawn(connection(
                stream, ticket, app, builder, tls, stopping, open,
            ));
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(open);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, all_closed.recv()).await;
    Ok(())
}

/// Serves one connection that has spoken.
async fn connection(
    stream: TcpStream,
    ticket: Arc<Ticket>,
    app: Router,
    builder: Arc<Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stopping: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    // Every request on the connection carries its ticket (see `routes::admit`).
    let service = TowerToHyperService::new(AddExtension::new(app, ticket));
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            drive(conn, stopping).await;
        }
        None => {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            drive(conn, stopping).await;
        }
    }
}

/// Runs a connection to its end, or, once the server stops, asks it to finish gracefully.
async fn drive<C: GracefulConnection>(conn: C, mut stopping: watch::Receiver<bool>) {
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stopping) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Completes once the server stops.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; it is dropped before this returns.
    let _ = stopping.wait_for(|stop| *stop).await.is_ok();
}
