//! Just enough pcap, IP and TCP parsing to check what crossed a link: the
//! byte stream of each TCP direction, reassembled by sequence number, and
//! whether it is nothing but TLS records.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

/// One direction of a TCP connection.
#[derive(Debug)]
pub struct Flow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
}

/// One direction's initial sequence number and its segments by offset.
type Segments = (Option<u32>, BTreeMap<u32, Vec<u8>>);

/// The TCP byte streams in a pcap file (Ethernet link type).
pub fn tcp_flows(pcap: &[u8]) -> Vec<Flow> {
    let mut flows: HashMap<(SocketAddr, SocketAddr), Segments> = HashMap::new();
    for frame in frames(pcap) {
        let Some((src, dst, seq, syn, payload)) = tcp_segment(frame) else {
            continue;
        };
        let entry = flows.entry((src, dst)).or_default();
        if syn {
            entry.0 = Some(seq.wrapping_add(1));
        }
        if !payload.is_empty() {
            let base = *entry.0.get_or_insert(seq);
            entry
                .1
                .entry(seq.wrapping_sub(base))
                .or_insert_with(|| payload.to_vec());
        }
    }
    flows
        .into_iter()
        .map(|((src, dst), (_, segs))| {
            let mut bytes = Vec::new();
            for (off, data) in segs {
                let off = off as usize;
                if off + data.len() <= bytes.len() {
                    continue; // a retransmission
                }
                assert!(
                    off <= bytes.len(),
                    "{src} -> {dst}: a gap in the capture at byte {}",
                    bytes.len()
                );
                bytes.extend_from_slice(&data[bytes.len() - off..]);
            }
            Flow { src, dst, bytes }
        })
        .collect()
}

/// Payload bytes per TCP direction, from the IP and TCP headers' lengths, so
/// a capture cut short with a small snap length (`Capture::headers`) still
/// counts every byte that crossed.
pub fn payload_bytes(pcap: &[u8]) -> HashMap<(SocketAddr, SocketAddr), u64> {
    let mut out = HashMap::new();
    for frame in frames(pcap) {
        if let Some(h) = tcp_header(frame) {
            *out.entry((h.src, h.dst)).or_default() += h.payload_len as u64;
        }
    }
    out
}

/// The captured bytes of each frame in a pcap file (Ethernet link type).
fn frames(pcap: &[u8]) -> Vec<&[u8]> {
    assert!(pcap.len() >= 24, "not a pcap file");
    let le = match &pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        m => panic!("not a pcap file (magic {m:02x?})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(u32_at(pcap, 20), 1, "only Ethernet captures are understood");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32_at(pcap, at + 8) as usize;
        out.push(&pcap[at + 16..(at + 16 + incl).min(pcap.len())]);
        at += 16 + incl;
    }
    out
}

/// A TCP frame's header fields; lengths come from the headers, not from
/// how much was captured.
struct TcpHeader {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    syn: bool,
    /// Offset of the payload in the frame.
    payload_at: usize,
    payload_len: usize,
}

fn tcp_header(f: &[u8]) -> Option<TcpHeader> {
    let (ethertype, ip) = (u16::from_be_bytes([*f.get(12)?, *f.get(13)?]), f.get(14..)?);
    // (source, destination, offset of TCP in `ip`, TCP length)
    let (src_ip, dst_ip, tcp_at, tcp_len): (IpAddr, IpAddr, usize, usize) = match ethertype {
        0x0800 if *ip.get(9)? == 6 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let a: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (a.into(), b.into(), ihl, total.checked_sub(ihl)?)
        }
        0x86dd if *ip.get(6)? == 6 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into(), 40, len)
        }
        _ => return None,
    };
    let tcp = ip.get(tcp_at..)?;
    let data_off = usize::from(*tcp.get(12)? >> 4) * 4;
    Some(TcpHeader {
        src: SocketAddr::new(src_ip, u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?])),
        dst: SocketAddr::new(dst_ip, u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?])),
        seq: u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?),
        syn: tcp.get(13)? & 0x02 != 0,
        payload_at: 14 + tcp_at + data_off,
        payload_len: tcp_len.checked_sub(data_off)?,
    })
}

/// (source, destination, sequence number, SYN, payload) of a fully captured
/// TCP frame.
fn tcp_segment(f: &[u8]) -> Option<(SocketAddr, SocketAddr, u32, bool, &[u8])> {
    let h = tcp_header(f)?;
    let payload = f.get(h.payload_at..h.payload_at + h.payload_len)?;
    Some((h.src, h.dst, h.seq, h.syn, payload))
}

/// Splits a byte stream into TLS records: (content type, length). Fails on
/// anything that is not a well-formed record.
pub fn tls_records(bytes: &[u8]) -> Result<Vec<(u8, usize)>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let h = bytes
            .get(i..i + 5)
            .ok_or_else(|| format!("truncated record header at byte {i}"))?;
        let (ty, version, len) = (
            h[0],
            u16::from_be_bytes([h[1], h[2]]),
            usize::from(u16::from_be_bytes([h[3], h[4]])),
        );
        if !matches!(ty, 0x14..=0x17) {
            return Err(format!("byte {i}: content type {ty:#04x} is not TLS"));
        }
        if !matches!(version, 0x0301 | 0x0303) {
            return Err(format!("byte {i}: record version {version:#06x}"));
        }
        if len > (1 << 14) + 256 {
            return Err(format!("byte {i}: record of {len} bytes"));
        }
        if i + 5 + len > bytes.len() {
            // The capture may end inside the last record.
            out.push((ty, len));
            break;
        }
        out.push((ty, len));
        i += 5 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_accept_records_and_refuse_plaintext() {
        let stream = [
            0x16, 0x03, 0x01, 0x00, 0x02, 0xaa, 0xbb, 0x17, 0x03, 0x03, 0x00, 0x01, 0x09,
        ];
        assert_eq!(tls_records(&stream).unwrap(), vec![(0x16, 2), (0x17, 1)]);
        assert!(tls_records(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
        assert!(
            tls_records(&[0x17, 0x03, 0x04, 0x00, 0x01, 0x00]).is_err(),
            "bad record version"
        );
    }
}
