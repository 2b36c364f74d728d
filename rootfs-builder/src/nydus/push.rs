//! Pushing a written Nydus image to a registry: every blob the registry lacks first
//! (one it has, such as a base layer two images share, is not sent again), then the
//! manifest by its digest, then the index under the tag, so the tag never names an
//! image whose blobs are not all there.

use std::path::Path;

use anyhow::{Context, Result};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistrySettings;
use oci_client::errors::OciDistributionError;
use oci_client::RegistryOperation;
use tokio::io::AsyncReadExt;

use super::layout::{manifest_entry, Blob, NydusImage, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST};

/// What a push sent.
#[derive(Debug, Default)]
pub struct Pushed {
    pub blobs_sent: usize,
    pub blobs_present: usize,
    pub bytes_sent: u64,
}

/// The bytes of `path` as a stream of chunks.
fn file_stream(
    path: &Path,
) -> impl futures::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static {
    let path = path.to_path_buf();
    futures::stream::unfold(None, move |file: Option<tokio::fs::File>| {
        let path = path.clone();
        async move {
            let mut f = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e.into()), None)),
                },
            };
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), Some(f)))
                }
                Err(e) => Some((Err(e.into()), None)),
            }
        }
    })
}

pub async fn push(
    image: &NydusImage,
    r: &Reference,
    settings: &RegistrySettings,
) -> Result<Pushed> {
    let shown = r.to_string();
    let client = settings.client(&r.registry);
    let oref: oci_client::Reference = shown.parse()?;
    client
        .auth(&oref, &settings.auth(&r.registry)?, RegistryOperation::Push)
        .await
        .with_context(|| format!("{shown}: authenticate to push"))?;
    let mut pushed = Pushed::default();
    let blobs: Vec<&Blob> = image.layers.iter().chain([&image.config]).collect();
    for blob in blobs {
        let present = client
            .blob_exists(&oref, &blob.digest)
            .await
            .with_context(|| format!("{shown}: ask for blob {}", blob.digest))?;
        if present {
            pushed.blobs_present += 1;
            continue;
        }
        client
            .push_blob_stream(
                &oref,
                file_stream(&blob.path),
                &blob.digest,
                Some(blob.size),
            )
            .await
            .with_context(|| format!("{shown}: push blob {}", blob.digest))?;
        pushed.blobs_sent += 1;
        pushed.bytes_sent += blob.size;
    }
    let by_digest: oci_client::Reference =
        format!("{}/{}@{}", r.registry, r.repository, image.manifest.digest).parse()?;
    let manifest = std::fs::read(&image.manifest.path)?;
    client
        .push_manifest_raw(
            &by_digest,
            manifest,
            http::HeaderValue::from_static(MEDIA_TYPE_MANIFEST),
        )
        .await
        .with_context(|| format!("{shown}: push manifest {}", image.manifest.digest))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [manifest_entry(&image.manifest, None)],
    });
    client
        .push_manifest_raw(
            &oref,
            serde_json::to_vec(&index)?,
            http::HeaderValue::from_static(MEDIA_TYPE_INDEX),
        )
        .await
        .with_context(|| format!("{shown}: push the index"))?;
    Ok(pushed)
}
