//! The stdio family: ReadStdout, ReadStderr, WriteStdin, CloseStdin, TtyWinResize.
//! The monitor holds the streams; these name the process and pass the call on.

use super::Agent;
use crate::error::{invalid, Result};
pub use crate::monitor::Stream;

impl Agent {
    /// One read of up to `len` bytes; an empty reply is the end of the stream.
    pub async fn read_stream(
        &self,
        cid: &str,
        eid: &str,
        which: Stream,
        len: u32,
    ) -> Result<Vec<u8>> {
        let (_c, p) = self.containers.process(cid, eid)?;
        p.read(which, len as usize).await
    }

    pub async fn write_stdin(&self, cid: &str, eid: &str, data: &[u8]) -> Result<u32> {
        let (_c, p) = self.containers.process(cid, eid)?;
        p.write(data).await?;
        Ok(data.len() as u32)
    }

    pub async fn close_stdin(&self, cid: &str, eid: &str) -> Result<()> {
        let (_c, p) = self.containers.process(cid, eid)?;
        p.close_stdin().await
    }

    pub async fn tty_win_resize(&self, cid: &str, eid: &str, rows: u32, cols: u32) -> Result<()> {
        let (_c, p) = self.containers.process(cid, eid)?;
        let rows =
            u16::try_from(rows).map_err(|_| invalid(format!("row count {rows} too large")))?;
        let cols =
            u16::try_from(cols).map_err(|_| invalid(format!("column count {cols} too large")))?;
        p.resize(rows, cols).await
    }
}
