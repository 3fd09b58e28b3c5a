//! The handle every gRPC task holds to a role's engine thread.

use tokio::sync::{mpsc, watch};

/// What an engine thread publishes after each turn of its loop.
pub trait Snapshot: Clone + PartialEq + Send + Sync + 'static {
    /// Nothing is queued, running, reserved or leased: a drain may end.
    fn idle(&self) -> bool;

    /// One line about what is held, for the drain's log lines.
    fn describe(&self) -> String;
}

/// The commands every engine thread takes besides its role's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The server has stopped: end the thread even if handles remain (connection tasks of a
    /// stopped server may outlive it).
    Stop,
    /// The drain deadline passed: fail whatever is left and free its blocks.
    AbortAll,
}

/// Why a command did not reach the engine thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The command channel is full: the worker is overloaded.
    Full,
    /// The engine thread has stopped.
    Stopped,
}

/// A cloneable handle to an engine thread: commands `C` through a bounded channel, the thread's
/// snapshots `S` through a watch.
pub struct EngineHandle<C, S> {
    tx: mpsc::Sender<C>,
    snapshot: watch::Receiver<S>,
}

impl<C, S> Clone for EngineHandle<C, S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            snapshot: self.snapshot.clone(),
        }
    }
}

/// The engine thread's ends of a handle.
pub struct EngineEnds<C, S> {
    pub commands: mpsc::Receiver<C>,
    pub published: watch::Sender<S>,
}

impl<C: Send + 'static, S: Snapshot> EngineHandle<C, S> {
    /// A handle whose channel holds `capacity` commands, the thread's ends, and the first
    /// snapshot (published before anyone can read: a load report taken before the thread's
    /// first turn would otherwise say no block is free).
    pub fn new(capacity: usize, first: S) -> (Self, EngineEnds<C, S>) {
        let (tx, commands) = mpsc::channel(capacity);
        let (published, snapshot) = watch::channel(first);
        (
            Self { tx, snapshot },
            EngineEnds {
                commands,
                published,
            },
        )
    }

    /// Queues a command, or refuses at once: a full channel is overload, said to the caller
    /// instead of waited out.
    pub fn submit(&self, cmd: C) -> Result<(), Refused> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::Full,
            mpsc::error::TrySendError::Closed(_) => Refused::Stopped,
        })
    }

    /// Queues a command, waiting for room: for commands that free resources, which must not be
    /// refused for overload.
    pub async fn send(&self, cmd: C) -> Result<(), Refused> {
        self.tx.send(cmd).await.map_err(|_| Refused::Stopped)
    }

    /// The snapshot of the thread's last turn, or `Stopped` once the thread has ended.
    pub fn current(&self) -> Result<S, Refused> {
        if self.snapshot.has_changed().is_err() {
            return Err(Refused::Stopped);
        }
        Ok(self.snapshot.borrow().clone())
    }

    /// The snapshot of the thread's last turn, whether or not it still runs.
    pub fn snapshot(&self) -> S {
        self.snapshot.borrow().clone()
    }

    /// Follows the snapshots (a metrics collector).
    pub fn snapshots(&self) -> watch::Receiver<S> {
        self.snapshot.clone()
    }

    /// Resolves when the thread reports idle (at once if it does), or has ended.
    pub async fn wait_idle(&self) {
        let mut snapshot = self.snapshot.clone();
        // An error means the engine thread ended, which leaves nothing pinned either.
        let _ = snapshot.wait_for(S::idle).await;
    }
}

impl<C: From<Control> + Send + 'static, S: Snapshot> crate::Drain for EngineHandle<C, S> {
    async fn wait_idle(&self) {
        EngineHandle::wait_idle(self).await
    }

    async fn abort_all(&self) {
        let _ = self.send(Control::AbortAll.into()).await;
    }

    async fn stop(&self) {
        let _ = self.send(Control::Stop.into()).await;
    }

    fn describe(&self) -> String {
        self.snapshot().describe()
    }
}

/// Publishes `now` unless it equals the last snapshot (a watcher wakes only on change).
pub fn publish<S: Snapshot>(published: &watch::Sender<S>, now: S) {
    published.send_if_modified(|was| {
        if *was == now {
            false
        } else {
            *was = now;
            true
        }
    });
}

/// Sleeps until `deadline`, or forever when there is none: the timer arm of an engine thread's
/// or a task's `select!`, whose next lease deadline may not exist.
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Busy(u32);

    impl Snapshot for Busy {
        fn idle(&self) -> bool {
            self.0 == 0
        }

        fn describe(&self) -> String {
            format!("busy={}", self.0)
        }
    }

    #[tokio::test]
    async fn a_full_channel_is_overload_and_a_gone_thread_is_stopped() {
        let (h, ends) = EngineHandle::<u32, Busy>::new(1, Busy(2));
        assert_eq!(h.submit(1), Ok(()));
        assert_eq!(h.submit(2), Err(Refused::Full));
        assert_eq!(h.current(), Ok(Busy(2)));
        publish(&ends.published, Busy(0));
        h.wait_idle().await;
        drop(ends);
        assert_eq!(h.submit(3), Err(Refused::Stopped));
        assert_eq!(h.current(), Err(Refused::Stopped));
        assert_eq!(h.snapshot(), Busy(0), "the last snapshot stays readable");
    }
}
