//! Addresses as the maps store them: 16 bytes in network order, IPv4 as
//! v4-mapped IPv6 (`::ffff:a.b.c.d`). One key type then serves both families,
//! and a v4 connection made from an IPv6 socket matches the agent's IPv4
//! listener.

/// An address in map form.
pub type Addr = [u8; 16];

/// The map form of an IPv4 address given as its four octets.
pub const fn from_v4_octets(o: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

/// Whether `a` is a v4-mapped address.
pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
/// Address families as the kernel numbers them.
pub const AF_INET6: u16 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let a = from_v4_octets([10, 1, 2, 3]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[10, 1, 2, 3]);
        let mut v6 = a;
        v6[10] = 0;
        assert!(!is_v4_mapped(&v6));
    }
}
