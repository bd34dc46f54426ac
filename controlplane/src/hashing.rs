//! Password hashing on a fixed set of threads. argon2id takes ~19 MiB and tens of
//! milliseconds per hash by design; computed on tokio's blocking pool, 100 concurrent logins
//! for unknown users took the control plane from 28 MB to 1.96 GB (every blocking thread
//! keeps its own malloc arena). Here at most `threads` hashes run at once, on the same
//! threads every time, and at most `queue` wait; past that a caller is refused at once
//! (`Busy`), so a flood of bad passwords costs a bounded amount of memory and time, and key
//! logins are never behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    /// Every hasher is busy and the queue is full.
    #[error("the server is busy checking passwords; try again in a few seconds")]
    Busy,
    /// A hasher thread is gone (it panicked); the job was lost.
    #[error("the password hasher stopped")]
    Stopped,
}

/// A bounded pool of password-hashing threads. Cheap to clone.
#[derive(Clone)]
pub struct HashPool {
    jobs: SyncSender<Job>,
    computed: Arc<AtomicU64>,
}

impl HashPool {
    /// `threads` hashers (at least 1) and room for `queue` more jobs waiting.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (jobs, receiver) = sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("envgate-hash-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = receiver.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("a hasher thread starts");
        }
        Self {
            jobs,
            computed: Arc::default(),
        }
    }

    /// Runs `hash` on a hasher thread, or refuses at once when the pool is full.
    pub async fn run<T: Send + 'static>(
        &self,
        hash: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, result) = oneshot::channel();
        let computed = self.computed.clone();
        let job: Job = Box::new(move || {
            computed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("envgate_controlplane_password_hashes_total").increment(1);
            let _ = done.send(hash());
        });
        match self.jobs.try_send(job) {
            Ok(()) => result.await.map_err(|_| HashError::Stopped),
            Err(TrySendError::Full(_)) => {
                metrics::counter!("envgate_controlplane_password_hashes_refused_total")
                    .increment(1);
                Err(HashError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => Err(HashError::Stopped),
        }
    }

    /// How many hashes this pool has computed, for tests and the benchmark.
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_pool_refuses_at_once_and_serves_again_after() {
        let pool = HashPool::new(1, 1);
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        // One job runs (blocked on the gate), one waits in the queue.
        let blocked = {
            let pool = pool.clone();
            let gate = gate.clone();
            tokio::spawn(
                async move { pool.run(move || gate.lock().unwrap().recv().unwrap()).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 7).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The third is refused without waiting.
        assert_eq!(pool.run(|| 8).await, Err(HashError::Busy));
        assert_eq!(
            HashError::Busy.to_string(),
            "the server is busy checking passwords; try again in a few seconds"
        );
        release.send(()).unwrap();
        assert_eq!(blocked.await.unwrap(), Ok(()));
        assert_eq!(queued.await.unwrap(), Ok(7));
        assert_eq!(pool.run(|| 9).await, Ok(9));
        assert_eq!(pool.computed(), 3);
    }
}
