//! Reading and writing context fields the way the verifier accepts them.
//!
//! The verifier only allows context access as one load or store of the
//! original context register plus a constant offset. LLVM does not know
//! that: it merges adjacent 4-byte accesses into 8-byte ones ("invalid
//! bpf_context access off=32 size=8"), and it hoists `ctx + 24` into a
//! register shared by several loads ("dereference of modified ctx ptr R1
//! off=24 disallowed"). Volatile accesses stop the first, not the second.
//! So every field access here is a single instruction written in assembly,
//! with its offset from `offset_of!`.

use core::ffi::c_void;

use mesh_common::addr::Addr;

/// Loads the 4-byte field at `ctx + OFF`.
#[inline(always)]
pub fn load32<const OFF: usize>(ctx: *const c_void) -> u32 {
    let v: u64;
    // SAFETY: a 4-byte load from the program's context at a field offset;
    // the verifier checks the offset is readable for this program type.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({c} + {o})",
            v = lateout(reg) v,
            c = in(reg) ctx,
            o = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v as u32
}

/// Loads the pointer field at `ctx + OFF` (e.g. `bpf_sock_addr.sk`).
#[inline(always)]
pub fn load_ptr<const OFF: usize>(ctx: *const c_void) -> *const c_void {
    let v: *const c_void;
    // SAFETY: an 8-byte load of a pointer field from the context; the
    // verifier types the result.
    unsafe {
        core::arch::asm!(
            "{v} = *(u64 *)({c} + {o})",
            v = lateout(reg) v,
            c = in(reg) ctx,
            o = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v
}

/// Stores `value` into the 4-byte field at `ctx + OFF`.
#[inline(always)]
pub fn store32<const OFF: usize>(ctx: *mut c_void, value: u32) {
    // SAFETY: a 4-byte store into the program's context at a field offset;
    // the verifier checks the offset is writable for this program type.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({c} + {o}) = {v}",
            c = in(reg) ctx,
            v = in(reg) u64::from(value),
            o = const OFF,
            options(nostack, preserves_flags),
        );
    }
}

/// Reads the IPv6 address field `$field` of context type `$ty` (four
/// network-order words) into map form.
macro_rules! load_ip6 {
    ($ctx:expr, $ty:ty, $field:ident) => {
        $crate::ctx::words_to_addr([
            $crate::ctx::load32::<{ core::mem::offset_of!($ty, $field) }>($ctx),
            $crate::ctx::load32::<{ core::mem::offset_of!($ty, $field) + 4 }>($ctx),
            $crate::ctx::load32::<{ core::mem::offset_of!($ty, $field) + 8 }>($ctx),
            $crate::ctx::load32::<{ core::mem::offset_of!($ty, $field) + 12 }>($ctx),
        ])
    };
}
pub(crate) use load_ip6;

/// Writes an address (map form) into the IPv6 address field `$field` of
/// context type `$ty`.
macro_rules! store_ip6 {
    ($ctx:expr, $ty:ty, $field:ident, $addr:expr) => {{
        let w = $crate::ctx::addr_to_words($addr);
        $crate::ctx::store32::<{ core::mem::offset_of!($ty, $field) }>($ctx, w[0]);
        $crate::ctx::store32::<{ core::mem::offset_of!($ty, $field) + 4 }>($ctx, w[1]);
        $crate::ctx::store32::<{ core::mem::offset_of!($ty, $field) + 8 }>($ctx, w[2]);
        $crate::ctx::store32::<{ core::mem::offset_of!($ty, $field) + 12 }>($ctx, w[3]);
    }};
}
pub(crate) use store_ip6;

/// Loads the 4-byte field `$field` of context type `$ty`.
macro_rules! load {
    ($ctx:expr, $ty:ty, $field:ident) => {
        $crate::ctx::load32::<{ core::mem::offset_of!($ty, $field) }>($ctx)
    };
}
pub(crate) use load;

/// Stores into the 4-byte field `$field` of context type `$ty`.
macro_rules! store {
    ($ctx:expr, $ty:ty, $field:ident, $v:expr) => {
        $crate::ctx::store32::<{ core::mem::offset_of!($ty, $field) }>($ctx, $v)
    };
}
pub(crate) use store;

/// Network-order words of an address in map form.
#[inline(always)]
pub fn addr_to_words(a: &Addr) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
    [w(0), w(1), w(2), w(3)]
}

/// The map form of a network-order IPv4 word.
#[inline(always)]
pub fn v4_word_to_addr(word: u32) -> Addr {
    mesh_common::addr::from_v4_octets(word.to_ne_bytes())
}

#[inline(always)]
pub fn words_to_addr(w: [u32; 4]) -> Addr {
    let mut a = [0u8; 16];
    for i in 0..4 {
        let b = w[i].to_ne_bytes();
        a[4 * i] = b[0];
        a[4 * i + 1] = b[1];
        a[4 * i + 2] = b[2];
        a[4 * i + 3] = b[3];
    }
    a
}

/// Whether an address (map form) is loopback or unspecified, for either family.
#[inline(always)]
pub fn is_local_only(a: &Addr) -> bool {
    if mesh_common::addr::is_v4_mapped(a) {
        return a[12] == 127 || (a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 0);
    }
    let mut head_zero = true;
    for b in &a[..15] {
        head_zero &= *b == 0;
    }
    head_zero && (a[15] == 1 || a[15] == 0)
}
