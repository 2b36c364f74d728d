//! The virtio-vsock device, in Firecracker's split: [`packet`] is the wire unit (header
//! parsing and bounds), [`csm`] one connection's state machine (handshake, credit-based
//! flow control, shutdown, reset), [`muxer`] the host side (hybrid vsock over Unix
//! sockets: many streams at once, host- and guest-initiated). The muxer speaks packets
//! and polls its own sockets through one epoll fd; the virtio device that moves those
//! packets through the guest's queues knows nothing of Unix sockets, and the muxer
//! nothing of queues or guest memory.

pub mod csm;
pub mod device;
pub mod muxer;
pub mod packet;
