//! Wire fixtures for the kata agent protocol.
//!
//! Every fixture below was worked out by hand from kata-containers' field
//! numbers and the protobuf encoding rules (tag = field_number << 3 |
//! wire_type; wire type 0 = varint, 2 = length-delimited; proto3 omits
//! default values). They were NOT produced by running this crate. If a field
//! of our `.proto` files is renumbered, retyped or moved, the encode side or
//! the decode side of these tests fails.

use joey_protocols::{agent, agent_ttrpc, health, health_ttrpc, oci};
use protobuf::{Message, MessageFull};

/// Parses a fixture: hex byte pairs, with `//` comments to end of line.
fn hex(fixture: &str) -> Vec<u8> {
    fixture
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex byte {b:?}")))
        .collect()
}

/// Encodes `msg`, compares with the fixture, decodes the fixture back and
/// compares with `msg`. Returns the decoded message for field checks.
fn check<M: Message + PartialEq + std::fmt::Debug>(msg: &M, fixture: &str) -> M {
    let expected = hex(fixture);
    let encoded = msg.write_to_bytes().expect("encode");
    assert_eq!(
        encoded,
        expected,
        "{} encodes differently from the hand-written fixture",
        M::NAME
    );
    let decoded = M::parse_from_bytes(&expected).expect("decode");
    assert_eq!(&decoded, msg, "{} decodes differently", M::NAME);
    decoded
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn health_check_request() {
    let mut req = health::CheckRequest::new();
    req.service = "agent".into();
    let d = check(&req, "0a 05 61 67 65 6e 74  // 1: service = \"agent\"");
    assert_eq!(d.service, "agent");
}

#[test]
fn health_check_response() {
    let mut resp = health::HealthCheckResponse::new();
    resp.status = health::health_check_response::ServingStatus::SERVING.into();
    let d = check(&resp, "08 01  // 1: status = SERVING (1)");
    assert_eq!(
        d.status.enum_value(),
        Ok(health::health_check_response::ServingStatus::SERVING)
    );
}

#[test]
fn create_sandbox_request() {
    let mut storage = agent::Storage::new();
    storage.driver = "9p".into();
    storage.source = "s".into();
    storage.fstype = "9p".into();
    storage.options = strings(&["ro"]);
    storage.mount_point = "/m".into();

    let mut req = agent::CreateSandboxRequest::new();
    req.hostname = "h".into();
    req.dns = strings(&["d"]);
    req.storages = vec![storage];
    req.sandbox_pidns = true;
    req.sandbox_id = "sb".into();

    let d = check(
        &req,
        "
        0a 01 68            // 1: hostname = \"h\"
        12 01 64            // 2: dns[0] = \"d\"
        1a 13               // 3: storages[0], 19 bytes:
          0a 02 39 70       //    1: driver = \"9p\"
          1a 01 73          //    3: source = \"s\"
          22 02 39 70       //    4: fstype = \"9p\"
          2a 02 72 6f       //    5: options[0] = \"ro\"
          32 02 2f 6d       //    6: mount_point = \"/m\"
        20 01               // 4: sandbox_pidns = true
        2a 02 73 62         // 5: sandbox_id = \"sb\"
        ",
    );
    assert_eq!(d.hostname, "h");
    assert_eq!(d.dns, ["d"]);
    assert_eq!(d.storages.len(), 1);
    let s = &d.storages[0];
    assert_eq!(
        (s.driver.as_str(), s.source.as_str(), s.fstype.as_str()),
        ("9p", "s", "9p")
    );
    assert_eq!(s.options, ["ro"]);
    assert_eq!(s.mount_point, "/m");
    assert!(d.sandbox_pidns);
    assert_eq!(d.sandbox_id, "sb");
}

#[test]
fn create_container_request() {
    let mut storage = agent::Storage::new();
    storage.driver = "9p".into();
    storage.source = "s".into();
    storage.mount_point = "/r".into();

    let mut process = oci::Process::new();
    process.Terminal = true;
    process.Args = strings(&["sh"]);
    process.Env = strings(&["A=1"]);
    process.Cwd = "/".into();

    let mut root = oci::Root::new();
    root.Path = "/r".into();

    let mut spec = oci::Spec::new();
    spec.Process = Some(process).into();
    spec.Root = Some(root).into();

    let mut req = agent::CreateContainerRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e1".into();
    req.storages = vec![storage];
    req.OCI = Some(spec).into();
    req.sandbox_pidns = true;

    let d = check(
        &req,
        "
        0a 02 63 31             // 1: container_id = \"c1\"
        12 02 65 31             // 2: exec_id = \"e1\"
        2a 0b                   // 5: storages[0], 11 bytes:
          0a 02 39 70           //    1: driver = \"9p\"
          1a 01 73              //    3: source = \"s\"
          32 02 2f 72           //    6: mount_point = \"/r\"
        32 16                   // 6: OCI (Spec), 22 bytes:
          12 0e                 //    2: Process, 14 bytes:
            08 01               //       1: Terminal = true
            22 02 73 68         //       4: Args[0] = \"sh\"
            2a 03 41 3d 31      //       5: Env[0] = \"A=1\"
            32 01 2f            //       6: Cwd = \"/\"
          1a 04                 //    3: Root, 4 bytes:
            0a 02 2f 72         //       1: Path = \"/r\"
        38 01                   // 7: sandbox_pidns = true
        ",
    );
    assert_eq!(d.container_id, "c1");
    assert_eq!(d.exec_id, "e1");
    assert_eq!(d.storages[0].mount_point, "/r");
    let p = &d.OCI.Process;
    assert!(p.Terminal);
    assert_eq!(p.Args, ["sh"]);
    assert_eq!(p.Env, ["A=1"]);
    assert_eq!(p.Cwd, "/");
    assert_eq!(d.OCI.Root.Path, "/r");
    assert!(d.sandbox_pidns);
}

#[test]
fn start_container_request() {
    let mut req = agent::StartContainerRequest::new();
    req.container_id = "c1".into();
    let d = check(&req, "0a 02 63 31  // 1: container_id = \"c1\"");
    assert_eq!(d.container_id, "c1");
}

#[test]
fn exec_process_request() {
    let mut process = oci::Process::new();
    process.Args = strings(&["ls"]);

    let mut req = agent::ExecProcessRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    req.process = Some(process).into();

    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        22 04               // 4: process, 4 bytes:
          22 02 6c 73       //    4: Args[0] = \"ls\"
        ",
    );
    assert_eq!(d.container_id, "c1");
    assert_eq!(d.exec_id, "e2");
    assert_eq!(d.process.Args, ["ls"]);
}

#[test]
fn wait_process_request() {
    let mut req = agent::WaitProcessRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        ",
    );
    assert_eq!((d.container_id.as_str(), d.exec_id.as_str()), ("c1", "e2"));
}

#[test]
fn wait_process_response() {
    let mut resp = agent::WaitProcessResponse::new();
    resp.status = 137;
    let d = check(&resp, "08 89 01  // 1: status = 137 (varint 0x89 0x01)");
    assert_eq!(d.status, 137);

    // int32 (not sint32): a negative value is a 10-byte two's-complement varint.
    resp.status = -1;
    let d = check(&resp, "08 ff ff ff ff ff ff ff ff ff 01  // 1: status = -1");
    assert_eq!(d.status, -1);
}

#[test]
fn signal_process_request() {
    let mut req = agent::SignalProcessRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    req.signal = 15;
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        18 0f               // 3: signal = 15 (SIGTERM)
        ",
    );
    assert_eq!(d.signal, 15);
}

#[test]
fn read_stream_request() {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    req.len = 1024;
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        18 80 08            // 3: len = 1024 (varint 0x80 0x08)
        ",
    );
    assert_eq!(d.len, 1024);
}

#[test]
fn read_stream_response() {
    let mut resp = agent::ReadStreamResponse::new();
    resp.data = b"out".to_vec();
    let d = check(&resp, "0a 03 6f 75 74  // 1: data = \"out\"");
    assert_eq!(d.data, b"out");
}

#[test]
fn write_stream_request_and_response() {
    let mut req = agent::WriteStreamRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    req.data = b"hi\n".to_vec();
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        1a 03 68 69 0a      // 3: data = \"hi\\n\"
        ",
    );
    assert_eq!(d.data, b"hi\n");

    let mut resp = agent::WriteStreamResponse::new();
    resp.len = 3;
    let d = check(&resp, "08 03  // 1: len = 3");
    assert_eq!(d.len, 3);
}

#[test]
fn close_stdin_request() {
    let mut req = agent::CloseStdinRequest::new();
    req.container_id = "c1".into();
    req.exec_id = "e2".into();
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        12 02 65 32         // 2: exec_id = \"e2\"
        ",
    );
    assert_eq!((d.container_id.as_str(), d.exec_id.as_str()), ("c1", "e2"));
}

#[test]
fn remove_container_request() {
    let mut req = agent::RemoveContainerRequest::new();
    req.container_id = "c1".into();
    req.timeout = 10;
    let d = check(
        &req,
        "
        0a 02 63 31         // 1: container_id = \"c1\"
        10 0a               // 2: timeout = 10
        ",
    );
    assert_eq!(d.timeout, 10);
}

#[test]
fn stats_container_request() {
    let mut req = agent::StatsContainerRequest::new();
    req.container_id = "c1".into();
    let d = check(&req, "0a 02 63 31  // 1: container_id = \"c1\"");
    assert_eq!(d.container_id, "c1");
}

#[test]
fn storage_shared_flag() {
    // kata 4.1: field 8 `bool shared` of Storage.
    let mut s = agent::Storage::new();
    s.driver = "blk".into();
    s.shared = true;
    let d = check(
        &s,
        "
        0a 03 62 6c 6b      // 1: driver = \"blk\"
        40 01               // 8: shared = true (varint)
        ",
    );
    assert!(d.shared);
}

#[test]
fn route_mtu() {
    // kata 4.1: field 8 `uint32 mtu` of types.Route.
    let mut r = joey_protocols::types::Route::new();
    r.dest = "d".into();
    r.flags = 1;
    r.mtu = 1500;
    let d = check(
        &r,
        "
        0a 01 64            // 1: dest = \"d\"
        38 01               // 7: flags = 1
        40 dc 0b            // 8: mtu = 1500 (varint 0x5dc)
        ",
    );
    assert_eq!((d.flags, d.mtu), (1, 1500));
}

#[test]
fn add_swap_path_request() {
    let mut req = agent::AddSwapPathRequest::new();
    req.path = "/s".into();
    let d = check(&req, "0a 02 2f 73  // 1: path = \"/s\"");
    assert_eq!(d.path, "/s");
}

#[test]
fn get_diagnostic_data() {
    let mut req = agent::GetDiagnosticDataRequest::new();
    req.log_type = "t".into();
    req.container_id = "c1".into();
    let d = check(
        &req,
        "
        0a 01 74            // 1: log_type = \"t\"
        12 02 63 31         // 2: container_id = \"c1\"
        ",
    );
    assert_eq!((d.log_type.as_str(), d.container_id.as_str()), ("t", "c1"));
    let mut resp = agent::GetDiagnosticDataResponse::new();
    resp.data = "x".into();
    let d = check(&resp, "0a 01 78  // 1: data = \"x\"");
    assert_eq!(d.data, "x");
}

#[test]
fn empty_requests() {
    // Field-less messages encode to zero bytes.
    check(&agent::DestroySandboxRequest::new(), "");
    check(&agent::GetOOMEventRequest::new(), "");
}

#[test]
fn oom_event() {
    let mut ev = agent::OOMEvent::new();
    ev.container_id = "c1".into();
    let d = check(&ev, "0a 02 63 31  // 1: container_id = \"c1\"");
    assert_eq!(d.container_id, "c1");
}

#[test]
fn message_full_names() {
    // The ttrpc wire carries no type names, but the package shows up in
    // method paths; make sure both packages came out as in kata.
    assert_eq!(
        agent::CreateContainerRequest::descriptor().full_name(),
        "grpc.CreateContainerRequest"
    );
    assert_eq!(oci::Spec::descriptor().full_name(), "grpc.Spec");
    assert_eq!(
        health::CheckRequest::descriptor().full_name(),
        "grpc.CheckRequest"
    );
    assert_eq!(
        joey_protocols::types::Interface::descriptor().full_name(),
        "types.Interface"
    );
    assert_eq!(
        joey_protocols::csi::VolumeStatsResponse::descriptor().full_name(),
        "grpc.VolumeStatsResponse"
    );
}

struct Unimplemented;
impl agent_ttrpc::AgentService for Unimplemented {}
impl health_ttrpc::Health for Unimplemented {}

#[test]
fn service_method_names() {
    use std::sync::Arc;

    // ttrpc dispatches on "<package>.<Service>" and the rpc name; these are
    // kata's names (method path "/grpc.AgentService/<Rpc>").
    let services = agent_ttrpc::create_agent_service(Arc::new(Unimplemented));
    let mut keys: Vec<_> = services.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["grpc.AgentService"]);
    let mut methods: Vec<_> = services["grpc.AgentService"]
        .methods
        .keys()
        .cloned()
        .collect();
    methods.sort();
    let mut expected = [
        "CreateContainer",
        "StartContainer",
        "RemoveContainer",
        "ExecProcess",
        "SignalProcess",
        "WaitProcess",
        "UpdateContainer",
        "UpdateEphemeralMounts",
        "StatsContainer",
        "PauseContainer",
        "ResumeContainer",
        "RemoveStaleVirtiofsShareMounts",
        "GetDiagnosticData",
        "WriteStdin",
        "ReadStdout",
        "ReadStderr",
        "CloseStdin",
        "TtyWinResize",
        "UpdateInterface",
        "UpdateRoutes",
        "ListInterfaces",
        "ListRoutes",
        "AddARPNeighbors",
        "GetIPTables",
        "SetIPTables",
        "GetMetrics",
        "MemAgentMemcgSet",
        "MemAgentCompactSet",
        "CreateSandbox",
        "DestroySandbox",
        "OnlineCPUMem",
        "ReseedRandomDev",
        "GetGuestDetails",
        "MemHotplugByProbe",
        "SetGuestDateTime",
        "CopyFile",
        "GetOOMEvent",
        "AddSwap",
        "AddSwapPath",
        "GetVolumeStats",
        "ResizeVolume",
        "SetPolicy",
    ];
    expected.sort();
    assert_eq!(methods, expected);

    let health = health_ttrpc::create_health(Arc::new(Unimplemented));
    let mut methods: Vec<_> = health["grpc.Health"].methods.keys().cloned().collect();
    methods.sort();
    assert_eq!(methods, ["Check", "Version"]);
}
