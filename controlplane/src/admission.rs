//! Admission control for container creation: at most `limit` creations at once on this
//! replica; the rest wait in line, first come first served, and each waiter is told how many
//! are ahead of it.
//!
//! Why a queue in front of the runtime rather than a timeout around it: 300 first logins at
//! 9:00 sent at once to one Docker engine make every creation slow (131 of 300 failed after
//! 60 s in the first bench), while the same 300 fed to it a few at a time each take about a
//! second. A waiter never times out in the line: the line moves because every creation ahead
//! of it is bounded (each runtime call has its own limit), and a waiter whose client went away
//! leaves the line (dropping its `acquire` future) without ever reaching the runtime.
//!
//! Two classes share the slots. A user waiting for their container always goes before a warm
//! pool refill (`pool.rs`), and refills never take the last free slot while the limit allows
//! more than one, so a user arriving behind a refill does not wait for it.
//!
//! The limit is per replica (see docs/decisions.md, "Admission control").

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Who a creation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A user waits for it (placement's cold creation).
    User,
    /// A warm container nobody waits for yet.
    Refill,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::User => "user",
            Class::Refill => "refill",
        }
    }
}

/// Creations at once unless configured otherwise: twice the cores, between 2 and 16. Creating
/// a container is mostly the engine's CPU work (runc, mounts, the network), so more than about
/// two per core only makes each one slower; see docs/operations.md for measuring it.
pub fn default_limit() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores * 2).clamp(2, 16)
}

pub struct Admission {
    state: Mutex<State>,
    /// Bumped whenever the line moves, so waiters look at their place again.
    moved: watch::Sender<u64>,
}

struct State {
    limit: usize,
    /// Slots held, refills included.
    running: usize,
    refills_running: usize,
    next_ticket: u64,
    users: VecDeque<u64>,
    refills: VecDeque<u64>,
    /// Let in by a release; the waiter has not picked its permit up yet.
    admitted: HashSet<u64>,
}

impl State {
    /// Refills leave the last slot to users (unless there is only one).
    fn refill_cap(&self) -> usize {
        self.limit.saturating_sub(1).max(1)
    }

    fn can_start(&self, class: Class) -> bool {
        self.running < self.limit
            && self.users.is_empty()
            && match class {
                Class::User => true,
                Class::Refill => {
                    self.refills.is_empty() && self.refills_running < self.refill_cap()
                }
            }
    }

    fn take_slot(&mut self, class: Class) {
        self.running += 1;
        if class == Class::Refill {
            self.refills_running += 1;
        }
    }

    fn free_slot(&mut self, class: Class) {
        self.running -= 1;
        if class == Class::Refill {
            self.refills_running -= 1;
        }
    }

    /// Lets waiters in while slots are free: users first, in order, then refills.
    fn admit_waiting(&mut self) {
        while self.running < self.limit {
            let (ticket, class) = if let Some(t) = self.users.pop_front() {
                (t, Class::User)
            } else if self.refills_running < self.refill_cap()
                && let Some(t) = self.refills.pop_front()
            {
                (t, Class::Refill)
            } else {
                break;
            };
            self.admitted.insert(ticket);
            self.take_slot(class);
        }
    }

    /// How many go before `ticket`: for a refill, every waiting user too.
    fn ahead(&self, class: Class, ticket: u64) -> usize {
        let line = match class {
            Class::User => &self.users,
            Class::Refill => &self.refills,
        };
        let before = line.iter().take_while(|t| **t != ticket).count();
        match class {
            Class::User => before,
            Class::Refill => self.users.len() + before,
        }
    }

    fn line(&mut self, class: Class) -> &mut VecDeque<u64> {
        match class {
            Class::User => &mut self.users,
            Class::Refill => &mut self.refills,
        }
    }
}

/// One creation's slot; dropping it lets the next waiter in.
pub struct Permit {
    admission: Arc<Admission>,
    class: Class,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        state.free_slot(self.class);
        state.admit_waiting();
        self.admission.publish(&state);
    }
}

/// A place in line; dropped before its permit was picked up (the client went away), it
/// leaves the line, or hands on the slot it was just given.
struct Queued<'a> {
    admission: &'a Admission,
    class: Class,
    ticket: u64,
    served: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut state = self.admission.lock();
        if state.admitted.remove(&self.ticket) {
            state.free_slot(self.class);
            state.admit_waiting();
        } else {
            let ticket = self.ticket;
            state.line(self.class).retain(|t| *t != ticket);
        }
        self.admission.publish(&state);
    }
}

impl Admission {
    /// At most `limit` (at least 1) creations at once.
    pub fn new(limit: usize) -> Arc<Self> {
        let admission = Arc::new(Self {
            state: Mutex::new(State {
                limit: limit.max(1),
                running: 0,
                refills_running: 0,
                next_ticket: 0,
                users: VecDeque::new(),
                refills: VecDeque::new(),
                admitted: HashSet::new(),
            }),
            moved: watch::Sender::new(0),
        });
        metrics::gauge!("envgate_create_limit").set(limit.max(1) as f64);
        admission
    }

    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Creations under way (slots held).
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Waiters in line, users and refills.
    pub fn waiting(&self) -> usize {
        let state = self.lock();
        state.users.len() + state.refills.len()
    }

    /// Waits for a slot. `waiting` is called with the number of waiters ahead each time it
    /// changes while this one is in line (never when a slot is free at once). Cancel-safe:
    /// dropping the future leaves the line.
    pub async fn acquire(self: &Arc<Self>, class: Class, mut waiting: impl FnMut(usize)) -> Permit {
        let mut moved = self.moved.subscribe();
        let ticket = {
            let mut state = self.lock();
            if state.can_start(class) {
                state.take_slot(class);
                self.publish(&state);
                return self.permit(class);
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.line(class).push_back(ticket);
            self.publish(&state);
            ticket
        };
        let mut queued = Queued {
            admission: self,
            class,
            ticket,
            served: false,
        };
        let mut told = None;
        loop {
            let ahead = {
                let mut state = self.lock();
                if state.admitted.remove(&ticket) {
                    queued.served = true;
                    return self.permit(class);
                }
                state.ahead(class, ticket)
            };
            if told != Some(ahead) {
                waiting(ahead);
                told = Some(ahead);
            }
            // The sender lives in `self`, so this never fails.
            let _ = moved.changed().await;
        }
    }

    fn permit(self: &Arc<Self>, class: Class) -> Permit {
        Permit {
            admission: self.clone(),
            class,
        }
    }

    /// Never held across an await.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the waiters and updates the gauges; called with the state still locked, so the
    /// gauges follow the order of changes.
    fn publish(&self, state: &State) {
        self.moved.send_modify(|n| *n += 1);
        metrics::gauge!("envgate_creations_running").set(state.running as f64);
        for class in [Class::User, Class::Refill] {
            let waiting = match class {
                Class::User => state.users.len(),
                Class::Refill => state.refills.len(),
            };
            metrics::gauge!("envgate_create_queue", "class" => class.label()).set(waiting as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    /// Polls `f` once: whether it is ready now.
    fn ready<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        f.now_or_never()
    }

    /// Starts `acquire` in a task that records every "ahead" it was told, then holds its
    /// permit until told to drop it.
    struct Waiter {
        told: Arc<Mutex<Vec<usize>>>,
        got: tokio::sync::oneshot::Receiver<()>,
        release: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Waiter {
        fn start(
            admission: &Arc<Admission>,
            class: Class,
            order: Arc<Mutex<Vec<usize>>>,
            id: usize,
        ) -> Self {
            let told = Arc::new(Mutex::new(Vec::new()));
            let (got_tx, got) = tokio::sync::oneshot::channel();
            let (release, release_rx) = tokio::sync::oneshot::channel::<()>();
            let admission = admission.clone();
            let record = told.clone();
            let task = tokio::spawn(async move {
                let permit = admission
                    .acquire(class, |ahead| record.lock().unwrap().push(ahead))
                    .await;
                order.lock().unwrap().push(id);
                let _ = got_tx.send(());
                let _ = release_rx.await;
                drop(permit);
            });
            Self {
                told,
                got,
                release: Some(release),
                task,
            }
        }

        async fn admitted(&mut self) {
            tokio::time::timeout(Duration::from_secs(10), &mut self.got)
                .await
                .expect("admitted in time")
                .expect("the waiter's task ran");
        }

        async fn finish(mut self) {
            let _ = self.release.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("finished in time")
                .unwrap();
        }

        fn told(&self) -> Vec<usize> {
            self.told.lock().unwrap().clone()
        }
    }

    /// Lets spawned tasks run until the line has `n` waiters.
    async fn until_waiting(admission: &Admission, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while admission.waiting() != n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waiters lined up");
    }

    /// The holder of a one-slot line (id 0), and `n` users lined up behind it in order (ids
    /// 1..=n); the ids in the order they got in.
    async fn holder_and_line(
        admission: &Arc<Admission>,
        n: usize,
    ) -> (Waiter, Vec<Waiter>, Arc<Mutex<Vec<usize>>>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut holder = Waiter::start(admission, Class::User, order.clone(), 0);
        holder.admitted().await;
        let mut line = Vec::new();
        for id in 1..=n {
            line.push(Waiter::start(admission, Class::User, order.clone(), id));
            until_waiting(admission, id).await;
        }
        (holder, line, order)
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order_and_told_their_place() {
        let admission = Admission::new(1);
        let (first, waiters, order) = holder_and_line(&admission, 4).await;
        assert_eq!(first.told(), Vec::<usize>::new(), "a free slot: no line");
        for (i, w) in waiters.iter().enumerate() {
            assert_eq!(w.told(), [i], "waiter {} arrived behind {i}", i + 1);
        }
        first.finish().await;
        for mut w in waiters {
            w.admitted().await;
            w.finish().await;
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn each_waiter_sees_its_place_count_down_to_next() {
        let admission = Admission::new(1);
        let (holder, line, _) = holder_and_line(&admission, 3).await;
        holder.finish().await;
        let mut line = line.into_iter();
        let mut next = line.next().unwrap();
        next.admitted().await;
        let rest: Vec<Waiter> = line.collect();
        until_waiting(&admission, 2).await;
        // Each was told its place, then (after the first left the line) one less.
        tokio::time::timeout(Duration::from_secs(10), async {
            while rest[0].told() != [1, 0] || rest[1].told() != [2, 1] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("told {:?} and {:?}", rest[0].told(), rest[1].told()));
        next.finish().await;
        for mut w in rest {
            w.admitted().await;
            w.finish().await;
        }
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_frees_its_place_and_a_given_slot() {
        let admission = Admission::new(1);
        let held = admission.acquire(Class::User, |_| {}).await;
        // Two in line; the first one gives up (its client went away).
        let mut leaving = Box::pin(admission.acquire(Class::User, |_| {}));
        assert!(ready(&mut leaving).is_none());
        let told = Arc::new(AtomicUsize::new(usize::MAX));
        let record = told.clone();
        let mut staying = Box::pin(admission.acquire(Class::User, move |ahead| {
            record.store(ahead, Ordering::SeqCst)
        }));
        assert!(ready(&mut staying).is_none());
        assert_eq!(told.load(Ordering::SeqCst), 1);
        drop(leaving);
        assert_eq!(admission.waiting(), 1);
        assert!(ready(&mut staying).is_none());
        assert_eq!(told.load(Ordering::SeqCst), 0, "moved up");
        drop(held);
        let permit = ready(&mut staying).expect("the slot went to the one that stayed");
        assert_eq!(admission.running(), 1);

        // Given the slot but gone before taking it: the slot goes on to the next.
        let mut given_up = Box::pin(admission.acquire(Class::User, |_| {}));
        assert!(ready(&mut given_up).is_none());
        let mut after = Box::pin(admission.acquire(Class::User, |_| {}));
        assert!(ready(&mut after).is_none());
        drop(permit);
        drop(given_up);
        let last = ready(&mut after).expect("the slot was handed on");
        assert_eq!((admission.running(), admission.waiting()), (1, 0));
        drop(last);
        assert_eq!(admission.running(), 0);
    }

    #[tokio::test]
    async fn users_go_before_refills_and_refills_leave_a_slot_free() {
        let admission = Admission::new(3);
        let refill_a = admission.acquire(Class::Refill, |_| {}).await;
        let refill_b = admission.acquire(Class::Refill, |_| {}).await;
        let mut third_refill = Box::pin(admission.acquire(Class::Refill, |_| {}));
        assert!(
            ready(&mut third_refill).is_none(),
            "the last slot is kept for users"
        );
        let user = ready(&mut Box::pin(admission.acquire(Class::User, |_| {})))
            .expect("a user takes the slot refills leave");
        let told = Arc::new(AtomicUsize::new(usize::MAX));
        let record = told.clone();
        let mut waiting_user = Box::pin(admission.acquire(Class::User, move |ahead| {
            record.store(ahead, Ordering::SeqCst)
        }));
        assert!(ready(&mut waiting_user).is_none());
        assert_eq!(told.load(Ordering::SeqCst), 0, "ahead of the queued refill");
        drop(refill_a);
        let user_2 = ready(&mut waiting_user).expect("the user, not the earlier refill");
        assert!(ready(&mut third_refill).is_none(), "no slot is free");
        drop(user);
        let refill_c = ready(&mut third_refill).expect("no user waits now");
        assert_eq!(admission.running(), 3);
        drop((refill_b, user_2, refill_c));
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_limit_holds_under_concurrency() {
        let admission = Admission::new(3);
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (admission, inside, most) = (admission.clone(), inside.clone(), most.clone());
                let class = if i % 3 == 0 {
                    Class::Refill
                } else {
                    Class::User
                };
                tokio::spawn(async move {
                    let _permit = admission.acquire(class, |_| {}).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("every waiter got in")
                .unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} creations at once");
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
    }
}
