//! Container images from OCI registries: references ([`reference`]), layer unpacking
//! ([`unpack`]), the pull into joey's image cache ([`pull`]) and the cache as a whole
//! ([`store`]: listing, in-use holds, pruning, the size cap).

pub mod pull;
pub mod reference;
pub mod store;
pub mod unpack;
