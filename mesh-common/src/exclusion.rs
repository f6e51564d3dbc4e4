//! Traffic the programs must leave alone.
//!
//! Map `mesh_excl_ports`: port (`u16`, host order) → flags.
//! Map `mesh_excl_cidrs`: LPM trie keyed by address (map form; IPv4 prefixes
//! are stored as `96 + len` over the v4-mapped address) → flags.

/// Do not capture outbound connections to this port or range.
pub const EXCLUDE_OUTBOUND: u32 = 1;
/// Do not capture inbound connections to this port.
pub const EXCLUDE_INBOUND: u32 = 2;
