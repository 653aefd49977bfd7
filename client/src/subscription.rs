//! A stream of one subscription's events.
use crate::client::Client;
use crate::error::ClientError;
use crate::router::EventRx;
use lorad_schema::Event;

/// The events of one subscription, replayed history first, then live ones.
///
/// Ends (yields `None`) when the connection drops or the subscription is ended. To carry on after a
/// dropped connection, reconnect and subscribe again with `since_seq` = [`Subscription::last_seq`]:
/// nothing is lost, because every event has a journal-wide `seq`. Dropping a subscription tells the
/// daemon to stop it; the subscription keeps its connection open while it lives.
pub struct Subscription {
    client: Client,
    id: u64,
    replay_until: u64,
    last_seq: u64,
    rx: EventRx,
    active: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("replay_until", &self.replay_until)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) fn new(
        client: Client,
        id: u64,
        since_seq: u64,
        replay_until: u64,
        rx: EventRx,
    ) -> Self {
        Subscription {
            client,
            id,
            replay_until,
            last_seq: since_seq,
            rx,
            active: true,
        }
    }

    /// The next event, or `None` once the subscription or its connection has ended. Cancel-safe: it can
    /// be used in `tokio::select!` without losing events.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.last_seq = self.last_seq.max(event.seq);
        Some(event)
    }

    /// The next event if one has already arrived, without waiting; `None` otherwise (and once ended).
    pub fn try_next(&mut self) -> Option<Event> {
        let event = self.rx.try_recv().ok()?;
        self.last_seq = self.last_seq.max(event.seq);
        Some(event)
    }

    /// The subscription id the daemon assigned (pushes carry it as `sub`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The `seq` of the newest event returned by [`Subscription::next`] (or the `since_seq` subscribed
    /// with, before any): pass it as `since_seq` to resume after a reconnect.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The journal's last `seq` when the subscription started: events up to it are replayed history,
    /// later ones happened after the subscription was made.
    pub fn replay_until(&self) -> u64 {
        self.replay_until
    }

    /// Ends the subscription and waits for the daemon to confirm.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.active = false;
        self.client.unsubscribe(self.id).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            self.client.shared().drop_sub(self.id);
        }
    }
}
