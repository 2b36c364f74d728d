//! `joeyctl agent --addr ADDR METHOD [JSON]`: one raw RPC, request and reply in the
//! proto3 JSON mapping (a debugging tool, like kata's agent-ctl). Any method of
//! `grpc.AgentService` or `grpc.Health` works, found through the protobuf descriptors.

use std::time::Duration;

use anyhow::Context;
use protobuf::reflect::{FileDescriptor, MethodDescriptor};

use joey_shim::addr::AgentAddr;
use joey_shim::client::AgentClient;

fn files() -> [&'static FileDescriptor; 2] {
    [
        joey_protocols::agent::file_descriptor(),
        joey_protocols::health::file_descriptor(),
    ]
}

/// Finds `Method`, `Service/Method` or `grpc.Service/Method`; returns the full
/// service name and the method.
pub fn find_method(name: &str) -> anyhow::Result<(String, MethodDescriptor)> {
    let (svc_want, method_want) = match name.rsplit_once('/') {
        Some((s, m)) => (Some(s.trim_start_matches("grpc.")), m),
        None => (None, name),
    };
    for fd in files() {
        for svc in fd.services() {
            if svc_want.is_some_and(|s| s != svc.proto().name()) {
                continue;
            }
            for m in svc.methods() {
                if m.proto().name() == method_want {
                    return Ok((
                        format!("{}.{}", fd.proto().package(), svc.proto().name()),
                        m,
                    ));
                }
            }
        }
    }
    anyhow::bail!("no method {name:?} in grpc.AgentService or grpc.Health (method names are CamelCase, e.g. CreateSandbox)")
}

/// Lists every method, for `joeyctl agent --list`.
pub fn list_methods() -> Vec<String> {
    let mut out = Vec::new();
    for fd in files() {
        for svc in fd.services() {
            for m in svc.methods() {
                out.push(format!(
                    "{}.{}/{}",
                    fd.proto().package(),
                    svc.proto().name(),
                    m.proto().name()
                ));
            }
        }
    }
    out
}

/// Encodes `json` as the method's request; returns the wire payload.
pub fn encode_request(method: &MethodDescriptor, json: &str) -> anyhow::Result<Vec<u8>> {
    let input = method.input_type();
    let msg = protobuf_json_mapping::parse_dyn_from_str(&input, json)
        .with_context(|| format!("{json:?} is not a valid {} in JSON", input.full_name()))?;
    Ok(msg.write_to_bytes_dyn()?)
}

pub async fn call(
    addr: &AgentAddr,
    name: &str,
    json: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let (service, method) = find_method(name)?;
    let payload = encode_request(&method, json)?;
    let client = AgentClient::connect(addr).await?;
    let mut req = ttrpc::Request::new();
    req.service = service.clone();
    req.method = method.proto().name().to_string();
    req.payload = payload;
    req.timeout_nano = timeout.as_nanos() as i64;
    let resp = client
        .raw
        .request(req)
        .await
        .map_err(|e| anyhow::anyhow!("{service}/{}: {e}", method.proto().name()))?;
    let out = method
        .output_type()
        .parse_from_bytes(&resp.payload)
        .context("decode the reply")?;
    Ok(protobuf_json_mapping::print_to_string(&*out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_found_by_any_of_their_names() {
        for n in [
            "CreateSandbox",
            "AgentService/CreateSandbox",
            "grpc.AgentService/CreateSandbox",
        ] {
            let (svc, m) = find_method(n).unwrap();
            assert_eq!(svc, "grpc.AgentService");
            assert_eq!(m.input_type().name(), "CreateSandboxRequest");
        }
        assert_eq!(find_method("Check").unwrap().0, "grpc.Health");
        assert!(find_method("NoSuchThing").is_err());
        // grpc.AgentService's 42 RPCs (kata 4.1.0) and grpc.Health's Check and Version.
        assert_eq!(list_methods().len(), 44);
    }

    #[test]
    fn json_requests_encode_to_the_wire_format() {
        let (_, m) = find_method("WaitProcess").unwrap();
        let bytes = encode_request(&m, r#"{"container_id":"c1","exec_id":"e"}"#).unwrap();
        assert_eq!(bytes, b"\x0a\x02c1\x12\x01e");
        assert!(encode_request(&m, r#"{"no_such_field":1}"#).is_err());
    }
}
