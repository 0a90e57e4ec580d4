//! The count of open WebSocket sessions (`WS_MAX_OBSERVERS`): a place in it
//! is taken before the upgrade and held by the session's Observer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A place in the count of connected observers, held by one Observer and
/// given back when it stops (or when it is dropped without starting).
#[derive(Debug)]
pub struct SessionSlot {
    /// The shared count this slot is part of.
    count: Arc<AtomicUsize>,
}

impl SessionSlot {
    /// Takes a place if fewer than `max` are taken.
    pub fn try_acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<SessionSlot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot {
                count: count.clone(),
            })
    }

    /// How many places are taken now.
    pub fn connected(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Gives the place back; returns how many are taken after that.
    pub fn release(self) -> usize {
        let count = self.count.clone();
        drop(self);
        count.load(Ordering::Acquire)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_slots_are_bounded_and_released() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = SessionSlot::try_acquire(&count, 2).expect("room");
        let b = SessionSlot::try_acquire(&count, 2).expect("room");
        assert!(SessionSlot::try_acquire(&count, 2).is_none());
        assert_eq!(a.connected(), 2);
        assert_eq!(b.release(), 1);
        assert!(SessionSlot::try_acquire(&count, 2).is_some());
        drop(a);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
