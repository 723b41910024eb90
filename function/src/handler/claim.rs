//! A delivery's claim on its request, held while the delivery works.
//!
//! The claim is renewed in the background every third of its lease, and confirmed before
//! every provider call: a process that was frozen (stopped, swapped out, a long GC-like
//! stall) past its lease may find on waking that another replica took the request over,
//! and its background renewal may not have run yet. Renewal only extends a claim this
//! delivery still holds; once it is gone (taken over, or expired and perhaps finished by
//! another replica) it is lost for good and no further call goes out.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::record::Records;

/// One delivery's claim.
pub(super) struct Claim {
    records: Records,
    id: String,
    token: String,
    lease: Duration,
    /// When the store last confirmed the claim as this delivery's.
    confirmed: Mutex<Instant>,
    lost: AtomicBool,
}

impl Claim {
    /// A claim the store just granted to `token`.
    pub(super) fn granted(records: Records, id: &str, token: &str, lease: Duration) -> Arc<Claim> {
        Arc::new(Claim {
            records,
            id: id.to_owned(),
            token: token.to_owned(),
            lease,
            confirmed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
        })
    }

    /// Renews the claim every third of its lease until it is lost (abort the task when the
    /// delivery ends).
    pub(super) fn keep_renewed(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let claim = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(claim.lease / 3).await;
                if !claim.renew().await {
                    break;
                }
            }
        })
    }

    /// Whether the claim is known lost (no store round trip).
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Whether the claim is still this delivery's, before a provider call: confirmed with
    /// the store unless the last confirmation is recent (within a third of the lease, so
    /// the claim has at least two thirds of it left).
    pub(super) async fn held(&self) -> bool {
        if self.lost() {
            return false;
        }
        if self.since_confirmed() < self.lease / 3 {
            return true;
        }
        self.renew().await
    }

    fn since_confirmed(&self) -> Duration {
        self.confirmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }

    /// Extends the claim if this delivery still holds it; returns whether it does. A store
    /// error is tolerated until the lease since the last confirmation has run out.
    async fn renew(&self) -> bool {
        match self.records.renew(&self.id, &self.token, self.lease).await {
            Ok(true) => {
                *self
                    .confirmed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
                true
            }
            Ok(false) => {
                tracing::warn!(id = %self.id, "the claim was lost (taken over, or expired while this replica stalled): no further call");
                self.lost.store(true, Ordering::Relaxed);
                false
            }
            Err(e) if self.since_confirmed() >= self.lease => {
                tracing::warn!(error = %e, id = %self.id, "the claim could not be renewed within its lease");
                self.lost.store(true, Ordering::Relaxed);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, id = %self.id, "renewing the claim failed");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(6);

    async fn granted(records: &Records) -> Arc<Claim> {
        assert!(records.claim("r", "a", LEASE).await.unwrap());
        Claim::granted(records.clone(), "r", "a", LEASE)
    }

    /// Recently confirmed: held without asking the store.
    #[tokio::test(start_paused = true)]
    async fn a_fresh_claim_is_held() {
        let records = Records::memory();
        let claim = granted(&records).await;
        assert!(claim.held().await);
    }

    /// A replica frozen past its lease (no renewal ran) wakes to find the request taken
    /// over: the claim is lost before the call, and stays lost.
    #[tokio::test(start_paused = true)]
    async fn a_claim_taken_over_while_frozen_is_lost_before_the_call() {
        let records = Records::memory();
        let claim = granted(&records).await;
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        assert!(
            records.claim("r", "b", LEASE).await.unwrap(),
            "b takes over"
        );
        assert!(!claim.held().await);
        assert!(claim.lost());
        assert!(!records.claim("r", "c", LEASE).await.unwrap(), "b keeps it");
    }

    /// Expired and released by the replica that finished the request: renewing does not
    /// take the free claim back.
    #[tokio::test(start_paused = true)]
    async fn an_expired_claim_is_not_taken_back() {
        let records = Records::memory();
        let claim = granted(&records).await;
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        assert!(!claim.held().await);
        assert!(records.claim("r", "b", LEASE).await.unwrap(), "still free");
    }

    /// The background renewal keeps a working delivery's claim past its first lease.
    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_the_claim() {
        let records = Records::memory();
        let claim = granted(&records).await;
        let task = claim.keep_renewed();
        tokio::time::sleep(LEASE * 3).await;
        assert!(claim.held().await);
        assert!(!records.claim("r", "b", LEASE).await.unwrap());
        task.abort();
    }
}
