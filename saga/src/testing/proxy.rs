//! A small TCP proxy for fault tests: put it between a host (or a client)
//! and PostgreSQL or RabbitMQ, then [`TcpProxy::cut`] the link and
//! [`TcpProxy::restore`] it, without disturbing anything else that talks to
//! the same server. [`TcpProxy::stall`] makes it a black hole instead: new
//! connections are accepted and then never answered, like a server that
//! died half-way through accepting them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A running proxy on `127.0.0.1:<port>` forwarding to one upstream address.
/// Dropping it stops it and closes every connection.
pub struct TcpProxy {
    port: u16,
    state: Arc<State>,
    listener: AbortHandle,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    stalled: AtomicBool,
    accepted: AtomicU64,
    swallowed: AtomicU64,
    links: Mutex<Vec<AbortHandle>>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards every connection to
    /// `upstream` (e.g. `127.0.0.1:5672`).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if accept_state.cut.load(Ordering::SeqCst) {
                    // Refused while cut: the client sees the connection close.
                    drop(inbound);
                    continue;
                }
                let link = if accept_state.stalled.load(Ordering::SeqCst) {
                    // Stalled: accepted, never answered, held open until
                    // the proxy is dropped (restoring does not release it).
                    accept_state.swallowed.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _held = inbound;
                        std::future::pending::<()>().await;
                    })
                } else {
                    accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    })
                };
                if let Ok(mut links) = accept_state.links.lock() {
                    links.retain(|l| !l.is_finished());
                    links.push(link.abort_handle());
                }
            }
        });
        Ok(Self {
            port,
            state,
            listener: task.abort_handle(),
        })
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `upstream_url` with its `host:port` replaced by this proxy's.
    /// Works for `postgres://user@host:port/db` and `amqp://u:p@host:port/vhost`.
    pub fn url_for(&self, upstream_url: &str) -> String {
        let (scheme, rest) = upstream_url.split_once("://").unwrap_or(("", upstream_url));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!(
            "{scheme}://{}127.0.0.1:{}{path}",
            userinfo.unwrap_or_default(),
            self.port
        )
    }

    /// Closes every open connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        if let Ok(mut links) = self.state.links.lock() {
            for link in links.drain(..) {
                link.abort();
            }
        }
    }

    /// Closes every open connection; new ones are accepted but never
    /// answered (and stay open, silent, even after [`Self::restore`]) until
    /// the proxy is dropped.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
        if let Ok(mut links) = self.state.links.lock() {
            for link in links.drain(..) {
                link.abort();
            }
        }
    }

    /// Forwards new connections again (after [`Self::cut`] or [`Self::stall`]).
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.stalled.store(false, Ordering::SeqCst);
    }

    /// How many connections a stall accepted and left unanswered.
    pub fn connections_swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::Relaxed)
    }

    /// How many connections were forwarded so far (reconnects show up here).
    pub fn connections_accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_point_at_the_proxy() {
        let proxy = TcpProxy::start("127.0.0.1:9".parse().expect("addr"))
            .await
            .expect("proxy");
        let port = proxy.port();
        assert_eq!(
            proxy.url_for("postgres://postgres@127.0.0.1:5432/db"),
            format!("postgres://postgres@127.0.0.1:{port}/db")
        );
        assert_eq!(
            proxy.url_for("amqp://guest:guest@localhost:5672/%2f"),
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        );
    }
}
