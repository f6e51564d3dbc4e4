//! Forwards the programs' aya-log records into the agent's `tracing` output
//! (via the `log` bridge), under the targets `mesh_ebpf::*`.

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

use super::Loaded;

/// Starts a task that drains the kernel log ring buffer as it fills. Returns
/// `None` when the object has no log statements (no ring buffer).
pub fn forward_logs(loaded: &mut Loaded) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match EbpfLogger::init(&mut loaded.bpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF log forwarding disabled: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, and
    // unchanged, for as long as the AsyncFd owns the logger.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("eBPF log forwarding disabled: {e}");
                return None;
            }
        };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
