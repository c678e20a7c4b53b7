//! Ctrl-C and SIGTERM: the temporary files of unfinished atomic writes are removed, the user is told, and the
//! process ends with 130 (143 for SIGTERM). The signals are blocked in every thread and taken by one thread with
//! `sigwait`, so the cleanup runs as ordinary code, not in a signal handler.

/// Installs the handling; call before any other thread starts (they inherit the blocked mask).
#[cfg(unix)]
pub fn install() {
    // SAFETY: plain libc calls on a local, initialised sigset; done before other threads exist.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let spawned = std::thread::Builder::new().name("edgepack-signals".into()).spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid sigset whose signals are blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let removed = edgepack_runtime::fsutil::remove_pending();
        let name = if sig == libc::SIGTERM { "SIGTERM" } else { "SIGINT" };
        let files = match removed {
            0 => String::new(),
            1 => "; removed 1 unfinished output file".into(),
            n => format!("; removed {n} unfinished output files"),
        };
        eprintln!("\ninterrupted ({name}){files}");
        if crate::output::json_errors() {
            crate::output::json_error(crate::exit::INTERRUPTED, "interrupted", &format!("interrupted ({name})"));
        }
        std::process::exit(128 + sig);
    });
    if spawned.is_err() {
        // No watcher: unblock so that the default disposition still ends the process.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

#[cfg(not(unix))]
pub fn install() {}
