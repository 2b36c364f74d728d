//! `joeyctl bench`: what joey's sandboxes cost, each against a peer run by this same
//! process.

pub mod ns;
pub mod vm;
