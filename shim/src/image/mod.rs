//! Container images from OCI registries. The pieces land as they are ready: image
//! references ([`reference`]) and layer unpacking ([`unpack`]) come first; the registry
//! client, the pull and the image cache build on them (issue 11).

pub mod reference;
pub mod unpack;
