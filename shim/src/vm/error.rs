//! What goes wrong starting a VM.

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The message names the object and the action (and, where there is one, the fix).
    #[error("{0}")]
    Setup(String),
}
