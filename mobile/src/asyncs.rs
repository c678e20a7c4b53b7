//! Async variants without an async runtime in the library: the work runs on its own thread and completes a future
//! that the foreign side polls (uniffi drives it from Swift/Kotlin/Python event loops).
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A future resolved by a worker thread running `f`.
pub(crate) struct Blocking<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

pub(crate) fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Blocking<T> {
    let slot = Arc::new(Mutex::new(Slot { value: None, waker: None }));
    let s = slot.clone();
    std::thread::spawn(move || {
        let v = f();
        let waker = {
            let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
            g.value = Some(v);
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    });
    Blocking { slot }
}

impl<T> Future for Blocking<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match g.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                g.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
