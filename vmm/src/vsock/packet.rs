//! The virtio-vsock wire unit: a 44-byte little-endian header (`struct
//! virtio_vsock_hdr`) and, for `RW` packets, up to `len` bytes of payload. Parsing
//! checks every field the device relies on; a malformed header is an error, never a
//! panic.

/// The header's size on the wire.
pub const HDR_LEN: usize = 44;

/// The largest payload the device moves in one packet (the Linux driver's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The only socket type virtio-vsock streams use.
pub const TYPE_STREAM: u16 = 1;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flags: the sender will receive (`RCV`) or send (`SEND`) no more.
pub mod shutdown {
    pub const RCV: u32 = 1;
    pub const SEND: u32 = 2;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("vsock header is {0} bytes, less than {HDR_LEN}")]
    Short(usize),
    #[error("vsock packet claims {0} payload bytes, more than {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("vsock packet has socket type {0}; only streams (1) are supported")]
    Type(u16),
    #[error("vsock packet has unknown op {0}")]
    Op(u16),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl Header {
    /// Parses and checks a header from the first [`HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Self, PacketError> {
        if b.len() < HDR_LEN {
            return Err(PacketError::Short(b.len()));
        }
        let h = Header {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            type_: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        };
        if h.type_ != TYPE_STREAM {
            return Err(PacketError::Type(h.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
            return Err(PacketError::Op(h.op));
        }
        if h.len as usize > MAX_PAYLOAD {
            return Err(PacketError::TooLong(h.len));
        }
        Ok(h)
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A header with its payload (empty unless `op` is `RW`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl Packet {
    /// A stream packet from the host (`src`) to the guest (`dst`) without payload.
    pub fn control(src_port: u32, dst_cid: u64, dst_port: u32, op: u16) -> Self {
        Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid,
                src_port,
                dst_port,
                type_: TYPE_STREAM,
                op,
                ..Default::default()
            },
            data: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_through_its_wire_form() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5000,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 262144,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        // Fixed offsets of struct virtio_vsock_hdr.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &5000u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::parse(&b), Ok(h));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let good = Packet::control(1, 3, 2, op::REQUEST).hdr;
        assert_eq!(
            Header::parse(&good.to_bytes()[..43]),
            Err(PacketError::Short(43))
        );
        let mut h = good;
        h.type_ = 2;
        assert_eq!(Header::parse(&h.to_bytes()), Err(PacketError::Type(2)));
        let mut h = good;
        h.op = 0;
        assert_eq!(Header::parse(&h.to_bytes()), Err(PacketError::Op(0)));
        h.op = 8;
        assert_eq!(Header::parse(&h.to_bytes()), Err(PacketError::Op(8)));
        let mut h = good;
        h.len = MAX_PAYLOAD as u32 + 1;
        assert!(matches!(
            Header::parse(&h.to_bytes()),
            Err(PacketError::TooLong(_))
        ));
    }

    #[test]
    fn parsing_random_bytes_never_panics() {
        // A small deterministic fuzz smoke: every input either parses into a header
        // whose fields pass the checks, or is an error.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = vec![0u8; (x % 64) as usize];
            for byte in &mut b {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            // Make some of them nearly valid, so the later checks are reached.
            if b.len() >= HDR_LEN && x.is_multiple_of(3) {
                b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
                b[30..32].copy_from_slice(&((x % 9) as u16).to_le_bytes());
            }
            if let Ok(h) = Header::parse(&b) {
                assert_eq!(h.type_, TYPE_STREAM);
                assert!(h.len as usize <= MAX_PAYLOAD);
            }
        }
    }
}
