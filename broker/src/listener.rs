//! The accept loop: never blocks on a handshake (that runs in the connection's own task), caps
//! connections in total and per source address before admission, backs off when accept fails
//! (EMFILE), and stops on shutdown. What becomes of an accepted connection is the caller's
//! (`serve`, statically dispatched): the loop knows nothing of sessions.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::caps::{FairShare, FairSlot, Source};
use crate::observe::log_limit::LogLimiter;
use crate::observe::metrics::{Limit, Metrics};
use crate::outcome::Refusal;

/// What the accept loop needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// `max_connections`.
    pub(crate) max_connections: usize,
    /// `max_pre_admission_per_source`.
    pub(crate) per_source: usize,
    /// `max_handshakes`.
    pub(crate) max_handshakes: usize,
    /// `proxy_protocol`: the client's address is known only once its header is read.
    pub(crate) proxy_protocol: bool,
    /// `proxy_from`: the balancers (address, prefix length); empty, any address.
    pub(crate) balancers: Vec<(IpAddr, u8)>,
    /// `log_interval_secs`.
    pub(crate) log_interval: Duration,
}

/// A TCP connection the listener let in.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) sock: TcpStream,
    pub(crate) peer: SocketAddr,
    /// Unique for the broker's life (router and session-table key).
    pub(crate) conn_id: u64,
    /// Its place in the source address's pre-admission share, given back at admission (`None`
    /// behind a PROXY-protocol balancer: taken once the header names the client).
    pub(crate) pre_admission: Option<FairSlot>,
    /// The pre-admission table (`max_handshakes` shared fairly between sources), for that.
    pub(crate) sources: Arc<FairShare>,
    /// Its place under `max_connections`, held until the connection ends.
    pub(crate) slot: ConnectionSlot,
    /// Where the live session's task is spawned (the broker waits for it at shutdown).
    pub(crate) tracker: TaskTracker,
}

/// A connection's place under `max_connections` and in `fleet_connections_open`, from accept
/// until it closes (whichever task holds it then).
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(metrics: &Metrics, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections_open.inc();
        Self { gauge: metrics.connections_open.clone(), _permit: permit }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts a connection the pre-admission table had no slot for, and says why: every slot taken
/// (`handshakes_busy`), or its source holding its share (`source_limit`).
pub(crate) fn pre_admission_refused(metrics: &Metrics, table: &FairShare, max_handshakes: usize) -> Refusal {
    if table.used() >= max_handshakes {
        metrics.rejected_at_accept(Refusal::HandshakesBusy);
        Refusal::HandshakesBusy
    } else {
        metrics.rejected_at_accept(Refusal::SourceLimit);
        metrics.limit(Limit::PerSource);
        Refusal::SourceLimit
    }
}

/// The log line's words for [`pre_admission_refused`]'s answer.
pub(crate) fn pre_admission_text(why: Refusal) -> &'static str {
    match why {
        Refusal::HandshakesBusy => "max_handshakes connections are in their handshake already (try again)",
        _ => "too many unauthenticated connections from this address",
    }
}

/// Is `ip` in the block `net`/`bits`? (IPv4-mapped IPv6 peers are compared as IPv4.)
pub(crate) fn within(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Accepts until `shutdown`, spawning `serve(connection)` on `tracker` for each.
pub(crate) async fn run<F, Fut>(
    limits: Limits,
    metrics: &Metrics,
    listener: TcpListener,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    serve: F,
) where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let pre_admission = Arc::new(FairShare::default());
    let mut source_limit_log = LogLimiter::new(limits.log_interval);
    let mut busy_log = LogLimiter::new(limits.log_interval);
    let mut proxy_log = LogLimiter::new(limits.log_interval);
    let mut full_log = LogLimiter::new(limits.log_interval);
    let next_conn = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept failed; backing off {} ms", backoff.as_millis());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        // Behind a PROXY-protocol balancer the client's address is known only once its header
        // is read, in the connection's task (`session::serve`), which applies the cap then.
        let slot = if limits.proxy_protocol {
            let balancers = &limits.balancers;
            if !balancers.is_empty() && !balancers.iter().any(|&(net, bits)| within(peer.ip(), net, bits)) {
                metrics.rejected_at_accept(Refusal::ProxyHeader);
                if let Some(skipped) = proxy_log.allow() {
                    warn!(%peer, reason = Refusal::ProxyHeader.label(), skipped, "connection refused: not from a balancer in proxy_from");
                }
                continue;
            }
            None
        } else {
            match pre_admission.enter(Source::of(peer.ip()), limits.per_source, limits.max_handshakes) {
                Some(s) => Some(s),
                None => {
                    let why = pre_admission_refused(metrics, &pre_admission, limits.max_handshakes);
                    let log =
                        if why == Refusal::HandshakesBusy { &mut busy_log } else { &mut source_limit_log };
                    if let Some(skipped) = log.allow() {
                        warn!(%peer, reason = why.label(), skipped, "connection refused: {}", pre_admission_text(why));
                    }
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.rejected_at_accept(Refusal::MaxConnections);
            // Rate-limited: anyone who reaches the port can make these while the broker is full.
            if let Some(skipped) = full_log.allow() {
                warn!(%peer, reason = Refusal::MaxConnections.label(), skipped, "connection refused: max_connections reached");
            }
            continue;
        };
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        let accepted = Accepted {
            sock,
            peer,
            conn_id,
            pre_admission: slot,
            sources: pre_admission.clone(),
            slot: ConnectionSlot::new(metrics, permit),
            tracker: tracker.clone(),
        };
        tracker.spawn(serve(accepted));
    }
}

#[cfg(test)]
mod tests {
    /// Counting log lines needs `tracing_subscriber`, a dependency of the `cli` feature.
    #[cfg(feature = "cli")]
    mod logged {
        use super::super::*;
        use std::io::Write;
        use std::sync::Mutex;
        use tokio::io::AsyncReadExt;

        /// The log lines written, for counting.
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);

        impl Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
            type Writer = Lines;
            fn make_writer(&'a self) -> Lines {
                self.clone()
            }
        }

        /// Anyone who reaches the port while `max_connections` is full (a scanner, a flood, a
        /// fleet reconnecting) made one warning per connection: the log grew as fast as they
        /// could connect.
        #[tokio::test(flavor = "current_thread")]
        async fn refusals_at_max_connections_are_logged_at_most_once_per_interval() {
            let lines = Lines::default();
            let _log = tracing::subscriber::set_default(
                tracing_subscriber::fmt().with_writer(lines.clone()).finish(),
            );
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (metrics, tracker, shutdown) = (Metrics::new(), TaskTracker::new(), CancellationToken::new());
            let limits = Limits {
                max_connections: 1,
                per_source: 32,
                max_handshakes: 512,
                proxy_protocol: false,
                balancers: Vec::new(),
                log_interval: Duration::from_secs(60),
            };
            // The one connection let in is held.
            let serve = |a: Accepted| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(a);
            };
            let clients = async {
                let _held = TcpStream::connect(addr).await.expect("connect");
                tokio::time::sleep(Duration::from_millis(50)).await;
                for _ in 0..20 {
                    let mut s = TcpStream::connect(addr).await.expect("connect");
                    let mut b = [0u8; 1];
                    // Closed at accept.
                    assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
                }
                shutdown.cancel();
            };
            tokio::join!(run(limits, &metrics, listener, &tracker, &shutdown, serve), clients);
            let text =
                String::from_utf8_lossy(&lines.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
            let n = text.matches("max_connections reached").count();
            assert_eq!(n, 1, "{n} lines for 20 refusals:\n{text}");
        }
    }
}
