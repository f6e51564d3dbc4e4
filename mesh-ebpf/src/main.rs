//! Kernel half of the mesh: captures pod traffic and hands it to the agent.
//!
//! One file per attach point; each entry point is a thin wrapper around a
//! `try_*` function. Built by `mesh-agent/build.rs` (aya-build) and embedded
//! in the agent binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Context fields are accessed with inline assembly; see ctx.rs.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod connect;
mod ctx;
mod fast_path;
mod getpeername;
mod maps;
mod release;
mod sk_lookup;
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here; this only satisfies no_std.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Lets `cargo build --workspace` on the host type-check this crate.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
