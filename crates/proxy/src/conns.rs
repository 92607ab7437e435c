//! Connection caps: how many client connections are open, in total and per listener, and
//! which of them have sent nothing yet. At a cap, the oldest of those silent connections is
//! shed to make room (it holds no work, and an attacker holding many connections keeps them
//! silent); only when there is none is the new connection refused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// What to do with a connection just accepted (pure; see [`admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Under both caps.
    Accept,
    /// The listener is at its cap: shed a silent connection of the same listener.
    ShedListener,
    /// The proxy is at its total cap: shed any silent connection.
    ShedAny,
}

/// Decides on a new connection from the counts before it and the caps.
pub fn admit(open: usize, cap: usize, listener_open: usize, listener_cap: usize) -> Admit {
    if listener_open >= listener_cap {
        Admit::ShedListener
    } else if open >= cap {
        Admit::ShedAny
    } else {
        Admit::Accept
    }
}

struct Silent {
    listener: Arc<str>,
    shed: CancellationToken,
}

/// Every open client connection, counted; the silent ones by age.
#[derive(Default)]
pub struct ConnTable {
    open: AtomicUsize,
    next: AtomicU64,
    silent: Mutex<BTreeMap<u64, Silent>>,
}

impl ConnTable {
    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Registers a new connection on `listener` (whose own count is `listener_open`); it is
    /// silent until [`Slot::heard`].
    pub fn register(
        self: &Arc<Self>,
        listener: &Arc<str>,
        listener_open: &Arc<AtomicUsize>,
    ) -> Arc<Slot> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let shed = CancellationToken::new();
        self.open.fetch_add(1, Ordering::Relaxed);
        listener_open.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Silent {
                listener: listener.clone(),
                shed: shed.clone(),
            },
        );
        Arc::new(Slot {
            id,
            table: self.clone(),
            listener_open: listener_open.clone(),
            heard: AtomicBool::new(false),
            shed,
        })
    }

    /// Sheds the oldest silent connection (of `listener` when given); returns the listener
    /// it was on, or `None` when there is none.
    pub fn shed_oldest(&self, listener: Option<&str>) -> Option<Arc<str>> {
        let mut silent = self.lock();
        let id = *silent
            .iter()
            .find(|(_, s)| listener.is_none_or(|l| *s.listener == *l))?
            .0;
        let s = silent.remove(&id)?;
        s.shed.cancel();
        Some(s.listener)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Silent>> {
        self.silent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open connection's place in the table; dropping it frees the place.
pub struct Slot {
    id: u64,
    table: Arc<ConnTable>,
    listener_open: Arc<AtomicUsize>,
    heard: AtomicBool,
    /// Cancelled when the connection is shed.
    pub shed: CancellationToken,
}

impl Slot {
    /// The client sent its first bytes: the connection is no longer sheddable.
    pub fn heard(&self) {
        if !self.heard.swap(true, Ordering::Relaxed) {
            self.table.lock().remove(&self.id);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.heard();
        self.table.open.fetch_sub(1, Ordering::Relaxed);
        self.listener_open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_against_the_caps() {
        // (open, cap, listener open, listener cap, expected)
        let cases = [
            (0, 10, 0, 5, Admit::Accept),
            (9, 10, 4, 5, Admit::Accept),
            (9, 10, 5, 5, Admit::ShedListener),
            (10, 10, 2, 5, Admit::ShedAny),
            // Both at cap: the listener's own connections go first.
            (10, 10, 5, 5, Admit::ShedListener),
            (100, 10, 0, 5, Admit::ShedAny),
        ];
        for (open, cap, lopen, lcap, want) in cases {
            assert_eq!(
                admit(open, cap, lopen, lcap),
                want,
                "{open}/{cap} {lopen}/{lcap}"
            );
        }
    }

    #[test]
    fn the_oldest_silent_connection_is_shed_first() {
        let table = Arc::new(ConnTable::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (na, nb) = (Arc::default(), Arc::default());
        let first = table.register(&a, &na);
        let second = table.register(&b, &nb);
        let third = table.register(&a, &na);
        assert_eq!((table.open(), na.load(Ordering::Relaxed)), (3, 2));
        // The oldest has spoken: no longer a candidate.
        first.heard();
        assert_eq!(table.shed_oldest(Some("a")).as_deref(), Some("a"));
        assert!(third.shed.is_cancelled() && !first.shed.is_cancelled());
        assert_eq!(table.shed_oldest(Some("a")), None);
        assert_eq!(table.shed_oldest(None).as_deref(), Some("b"));
        assert!(second.shed.is_cancelled());
        assert_eq!(table.shed_oldest(None), None);
        drop((first, second, third));
        assert_eq!((table.open(), na.load(Ordering::Relaxed)), (0, 0));
    }
}
