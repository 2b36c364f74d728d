//! Container images from OCI registries: references ([`reference`]), layer unpacking
//! ([`unpack`]) and the pull into joey's image cache ([`pull`]).

pub mod pull;
pub mod reference;
pub mod unpack;
