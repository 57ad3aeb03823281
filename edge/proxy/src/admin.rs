//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::RwLock;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Each mesh peer's name and whether its tunnel is up, for `/readyz`.
pub type TunnelStates = Arc<dyn Fn() -> Vec<(String, bool)> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Arc<RwLock<Registry>>,
    ready: Arc<AtomicBool>,
    tunnels: Option<TunnelStates>,
}

/// Binds the admin port; serving starts with [`AdminServer::serve`].
pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

impl AdminServer {
    pub async fn bind(
        address: SocketAddr,
        registry: Arc<RwLock<Registry>>,
        ready: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        Ok(AdminServer {
            listener,
            state: AdminState {
                registry,
                ready,
                tunnels: None,
            },
        })
    }

    /// `/readyz` also lists the mesh's tunnels (`tunnel <peer>: up|down`).
    /// A peer that is down does not make the edge unready: its local
    /// virtual clusters still serve, and remote ones recover with the peer.
    pub fn with_tunnels(mut self, tunnels: TunnelStates) -> Self {
        self.state.tunnels = Some(tunnels);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    // Registration (on reconfiguration) takes the write lock briefly; scrapes share the read lock.
    let registry = state.registry.read().await;
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let (status, mut body) = if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, String::from("ready\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
    };
    for (peer, up) in state.tunnels.as_ref().map(|t| t()).unwrap_or_default() {
        body.push_str(&format!(
            "tunnel {peer}: {}\n",
            if up { "up" } else { "down" }
        ));
    }
    (status, body)
}
