//! A session's queue of deliveries from the router: bounded, never blocking the publisher (a
//! full inbox refuses, and the router counts the drop), and free while empty.
//!
//! Why not a `tokio::sync::mpsc` channel: one costs ~800 bytes per session as soon as it is
//! created (its cache-padded halves and a first block of 32 slots), on every idle session
//! (BENCHMARKS.md, memory per idle session). This is a mutex-guarded `VecDeque`, which allocates
//! only when a message arrives and gives the memory back when the session goes idle, and a
//! `Notify` (~60 bytes in all).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use crate::message::Message;
use tokio::sync::Notify;

/// Deliveries waiting for one session.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Box<Message>>>,
    ready: Notify,
    capacity: usize,
}

impl Inbox {
    /// An empty inbox holding at most `capacity` messages.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), ready: Notify::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Box<Message>>> {
        // Every critical section is one push or pop: a poisoned lock holds a consistent queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `p`; `false` (and `p` dropped) if the inbox is full.
    pub(crate) fn push(&self, p: Box<Message>) -> bool {
        {
            let mut q = self.lock();
            if q.len() >= self.capacity {
                return false;
            }
            q.push_back(p);
        }
        // Stores a permit if the session is not waiting: the next `next` returns at once.
        self.ready.notify_one();
        true
    }

    /// The oldest message, waiting for one if there is none. Cancel-safe: a message is taken
    /// only in the poll that returns it.
    pub(crate) async fn next(&self) -> Box<Message> {
        loop {
            if let Some(p) = self.lock().pop_front() {
                return p;
            }
            self.ready.notified().await;
        }
    }

    /// The oldest message, if any, without waiting.
    pub(crate) fn try_next(&self) -> Option<Box<Message>> {
        self.lock().pop_front()
    }

    /// Gives back the queue's memory if it is empty (an idle session).
    pub(crate) fn release(&self) {
        let mut q = self.lock();
        if q.is_empty() {
            q.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;

    fn msg(i: u8) -> Box<Message> {
        Box::new(Message::new("devices/a/commands/x", QoS::AtMostOnce, vec![i]))
    }

    #[tokio::test]
    async fn in_order_bounded_and_a_waiting_session_is_woken() {
        let inbox = std::sync::Arc::new(Inbox::new(2));
        assert!(inbox.push(msg(1)) && inbox.push(msg(2)));
        assert!(!inbox.push(msg(3)), "a full inbox refuses");
        assert_eq!(inbox.next().await.payload[..], [1]);
        assert_eq!(inbox.next().await.payload[..], [2]);
        assert!(inbox.try_next().is_none());
        // A session already waiting gets the next push.
        let waiter = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.next().await.payload[0] }
        });
        tokio::task::yield_now().await;
        assert!(inbox.push(msg(4)));
        assert_eq!(waiter.await.expect("waiter"), 4);
        inbox.release();
        assert_eq!(inbox.lock().capacity(), 0, "an idle inbox holds no memory");
    }
}
