//! Container images from OCI registries: references ([`reference`]), digests
//! ([`digest`]), OCI image layouts on disk ([`layout`]), how registries are reached
//! ([`registry`]), layer unpacking
//! ([`unpack`]), the pull into joey's image cache ([`pull`]) and the cache as a whole
//! ([`store`]: listing, in-use holds, pruning, the size cap).

pub mod digest;
pub mod layout;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod spool;
pub mod store;
pub mod unpack;
