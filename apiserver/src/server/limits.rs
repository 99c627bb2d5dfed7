//! Limits on what one caller can hold open: watches, each a connection and a place in the
//! change feed for as long as its client likes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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
}
