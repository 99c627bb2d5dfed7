//! Limits on what callers can hold open: connections that have not shown a token, and
//! watches (each a connection and a place in the change feed for as long as its client
//! likes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::error::ApiError;

/// Default cap on open watches, in total.
pub const DEFAULT_MAX_WATCHES: usize = 1024;
/// Default cap on open watches per token: a dashboard opens a handful per tab.
pub const DEFAULT_MAX_WATCHES_PER_TOKEN: usize = 32;

/// How long a refused watcher is told to wait before trying again, seconds.
const RETRY_AFTER_SECONDS: u64 = 5;

/// Open watches, counted per token and in total.
#[derive(Debug)]
pub struct WatchSlots {
    max_total: usize,
    max_per_token: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_token: HashMap<String, usize>,
}

/// One open watch; dropping it (the client went away, the stream ended) frees its place.
#[derive(Debug)]
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    token: String,
}

impl WatchSlots {
    /// At most `max_total` watches, at most `max_per_token` for any one token.
    pub fn new(max_total: usize, max_per_token: usize) -> Arc<Self> {
        Arc::new(WatchSlots {
            max_total,
            max_per_token,
            open: Mutex::new(Open::default()),
        })
    }

    /// A place for one more watch of `token` (a token's name), or 429 with `Retry-After`.
    pub fn acquire(self: &Arc<Self>, token: &str) -> Result<WatchSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = open.per_token.get(token).copied().unwrap_or(0);
        if mine >= self.max_per_token {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "token `{token}` already has {mine} open watches, the most one token may hold"
                ),
                hint: "close watches you no longer read (each dashboard tab holds a few), or raise --max-watches-per-token".into(),
                retry_after_seconds: RETRY_AFTER_SECONDS,
            });
        }
        if open.total >= self.max_total {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "the apiserver already serves {} watches, the most it takes",
                    open.total
                ),
                hint: "try again later, or raise --max-watches".into(),
                retry_after_seconds: RETRY_AFTER_SECONDS,
            });
        }
        open.total += 1;
        *open.per_token.entry(token.to_string()).or_default() += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            token: token.to_string(),
        })
    }

    /// Watches open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_token.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.per_token.remove(&self.token);
            }
        }
    }
}

/// Default cap on connections that have not yet shown a token, in total.
pub const DEFAULT_MAX_ANONYMOUS_CONNECTIONS: usize = 1024;
/// Default cap on connections that have not yet shown a token, from one address.
pub const DEFAULT_MAX_ANONYMOUS_CONNECTIONS_PER_PEER: usize = 256;

/// How long a connection accepted over the limits has to send its first request.
const OVER_LIMIT_FIRST_REQUEST: Duration = Duration::from_secs(1);

/// Connections that have not (yet) shown a valid token — *anonymous* ones — counted in total
/// and per peer address. Connections whose requests carry a valid token are not limited: a
/// flood of idle or tokenless connections must always leave room for nodes and operators.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_peer: usize,
    first_request: Duration,
    anonymous: Mutex<Anonymous>,
}

#[derive(Debug, Default)]
struct Anonymous {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One accepted connection's standing, carried by each of its requests. Dropped with the
/// connection.
#[derive(Debug)]
pub struct Ticket {
    limits: Arc<ConnectionLimits>,
    peer: IpAddr,
    /// Accepted while the anonymous connections were over a limit: such a connection is
    /// served only for requests with a valid token (and health probes), then closed.
    over_limit: bool,
    /// A request on it carried a valid token: it no longer counts as anonymous.
    known: AtomicBool,
}

impl ConnectionLimits {
    /// At most `max_total` anonymous connections, at most `max_per_peer` from one address;
    /// every connection has `first_request` to send its first bytes.
    pub fn new(max_total: usize, max_per_peer: usize, first_request: Duration) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_peer,
            first_request,
            anonymous: Mutex::new(Anonymous::default()),
        })
    }

    /// Counts a new connection from `peer` as anonymous, noting whether it came over a limit.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Arc<Ticket> {
        let mut anonymous = self
            .anonymous
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let from_peer = anonymous.per_peer.entry(peer).or_default();
        let over_limit = *from_peer >= self.max_per_peer || anonymous.total >= self.max_total;
        *anonymous.per_peer.entry(peer).or_default() += 1;
        anonymous.total += 1;
        Arc::new(Ticket {
            limits: self.clone(),
            peer,
            over_limit,
            known: AtomicBool::new(false),
        })
    }

    /// How long a connection has to send its first bytes: the header-read timeout for most,
    /// a second for one accepted over the limits.
    pub fn first_request_deadline(&self, ticket: &Ticket) -> Duration {
        if ticket.over_limit {
            OVER_LIMIT_FIRST_REQUEST.min(self.first_request)
        } else {
            self.first_request
        }
    }

    /// Anonymous connections open now.
    pub fn anonymous(&self) -> usize {
        self.anonymous
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    fn release(&self, peer: IpAddr) {
        let mut anonymous = self
            .anonymous
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        anonymous.total = anonymous.total.saturating_sub(1);
        if let Some(count) = anonymous.per_peer.get_mut(&peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                anonymous.per_peer.remove(&peer);
            }
        }
    }
}

impl Ticket {
    /// Accepted over a limit and not known since.
    pub fn restricted(&self) -> bool {
        self.over_limit && !self.known.load(Ordering::Relaxed)
    }

    /// A request on this connection carried a valid token.
    pub fn known(&self) {
        if !self.known.swap(true, Ordering::Relaxed) {
            self.limits.release(self.peer);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.known.load(Ordering::Relaxed) {
            self.limits.release(self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_are_capped_per_token_and_in_total_and_freed_on_drop() {
        let slots = WatchSlots::new(3, 2);
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let refused = slots.acquire("a").unwrap_err();
        assert!(
            matches!(&refused, ApiError::TooManyRequests { message, .. } if message.contains("token `a`")),
            "{refused:?}"
        );
        let _b1 = slots.acquire("b").unwrap();
        let full = slots.acquire("c").unwrap_err();
        assert!(
            matches!(&full, ApiError::TooManyRequests { message, .. } if message.contains("3 watches")),
            "{full:?}"
        );
        assert_eq!(slots.open(), 3);
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _c1 = slots.acquire("c").expect("a freed place is taken again");
        assert!(slots.acquire("a").is_err(), "the total is full again");
    }

    #[test]
    fn anonymous_connections_are_counted_per_peer_and_in_total_until_known() {
        let limits = ConnectionLimits::new(3, 2, Duration::from_secs(10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.admit(a);
        let a2 = limits.admit(a);
        let a3 = limits.admit(a);
        assert!(!a1.restricted() && !a2.restricted());
        assert!(
            a3.restricted(),
            "a third from one peer is over the per-peer limit"
        );
        let b1 = limits.admit(b);
        assert!(
            b1.restricted(),
            "four anonymous connections are over the total"
        );
        // A token makes a connection known: it stops counting, and is no longer restricted.
        b1.known();
        assert!(!b1.restricted());
        assert_eq!(limits.anonymous(), 3);
        a3.known();
        a1.known();
        assert_eq!(limits.anonymous(), 1);
        let b2 = limits.admit(b);
        assert!(!b2.restricted(), "room again");
        drop(a2);
        drop(b2);
        drop(a1);
        assert_eq!(limits.anonymous(), 0, "known ones are not released twice");
    }
}
