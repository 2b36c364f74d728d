//! Gives the heap's freed memory back to the kernel once a burst of RPCs is over.
//! glibc keeps freed memory in its arenas: after hundreds of concurrent RPCs the agent
//! would stay megabytes bigger for good (the load test bounds the growth per round).

use std::time::Duration;

use crate::listener::WriteCounter;

/// How long the agent's connections must be quiet (no reply written) before a trim.
const QUIET: Duration = Duration::from_millis(200);

/// Starts the task: after any reply, once the connections have been quiet for
/// [`QUIET`], trim. Idle, it sleeps on the write counter (no timer wakes it).
pub fn after_bursts(writes: &WriteCounter) {
    let mut rx = writes.subscribe();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            loop {
                match tokio::time::timeout(QUIET, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return,
                    Err(_quiet) => break,
                }
            }
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is
    // thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}
