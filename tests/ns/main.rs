//! Tier 2: the real joey-init and joey-agent in namespace sandboxes, driven through
//! the shim client and joeyctl exactly as in production. Needs root.

mod bad_input;
mod cli;
mod common;
mod imaged;
mod load;
mod nydus;
mod registry;
mod registry_auth;
mod registry_layers;
mod restart;
mod rpc;
mod stale;
mod surface;

use joey_tests::{block_on, run_tier, Test};

fn main() {
    let mut tests = joey_tests::tier_tests![
        cli::echo_hello,
        cli::stdout_and_stderr_are_separate,
        cli::exit_codes_0_and_7,
        cli::stdin_round_trip,
        cli::env_cwd_and_hostname,
        cli::writes_stay_in_memory,
        cli::run_leaves_nothing_behind,
        cli::a_killed_joeyctl_leaves_nothing_after_the_next_start,
        cli::bad_rootfs_is_a_clear_error,
        rpc::init_sigterm_without_handler_is_137,
        rpc::exec_sigterm_is_143_and_exec_exit_codes,
        rpc::exec_stdin_round_trip,
        rpc::two_containers_in_one_sandbox,
        rpc::two_sandboxes_at_once,
        rpc::kata_lifecycle,
        rpc::tty_container_gets_a_terminal,
        rpc::hybrid_vsock_handshake,
        rpc::sandbox_pidns_is_shared,
        rpc::raw_rpc_cli,
        rpc::standalone_agent,
        stale::standalone_agent_discards_a_dead_sandbox,
        bad_input::bad_requests_are_refused_and_the_agent_keeps_serving,
        bad_input::oversized_frames_and_garbage_keep_the_agent_serving,
        restart::pipes_survive_an_agent_restart,
        restart::terminals_survive_an_agent_restart,
        restart::the_sandbox_ends_when_the_monitor_dies,
        restart::the_agents_socket_outlives_the_agent_not_the_sandbox,
        registry::run_by_tag_digest_and_offline,
        registry::image_cache_ls_cap_and_prune,
        registry::concurrent_pulls_download_each_layer_once,
        registry::bad_images_are_refused,
        registry::a_manifest_list_resolves_to_linux_amd64,
        registry_auth::https_with_basic_auth,
        registry_auth::bearer_token_auth,
        registry_layers::multi_layer_image_matches_umoci,
        nydus::a_directory_converts_to_an_equal_tree,
        nydus::an_oci_layout_converts_like_umoci_unpacks_it,
        nydus::pushed_images_share_a_base_layer_in_nydus_format,
        nydus::bad_input_is_refused_and_leaves_nothing,
        nydus::dedup_across_layers_stores_repeated_chunks_once,
        nydus::a_push_cut_half_way_leaves_no_tag,
        imaged::a_registry_image_is_read_lazily,
        imaged::a_nydus_image_runs_in_namespace_sandboxes,
        imaged::a_running_service_resolves_the_tag,
        imaged::concurrent_readers_fetch_each_chunk_once,
        imaged::reads_fail_at_once_when_the_service_dies,
        imaged::the_chunk_cache_keeps_to_the_cache_cap,
        imaged::an_image_mounted_after_a_sandbox_started_reaches_it,
        imaged::failures_are_errors_not_wrong_bytes,
        imaged::lazy_reads_through_https_basic_auth_and_bearer_tokens,
        surface::oom_kills_are_events_and_exit_137,
        surface::update_lowers_the_memory_limit_and_stats_count_the_network,
        surface::pause_stops_and_resume_restarts,
        surface::copied_files_and_the_termination_log,
        surface::metrics_volume_stats_and_ephemeral_mounts,
        surface::machine_rpcs_are_refused_outside_a_vm,
        surface::seccomp_profiles_apply_to_processes_and_execs,
        load::two_hundred_containers_and_a_thousand_execs,
    ];
    // The vsock transport needs a host vsock device, which these machines lack: that
    // is a property of the machine, not of the tier, so it is skipped even in strict mode.
    tests.push(Test {
        name: "rpc::vsock_transport",
        run: || block_on(rpc::vsock_transport()),
        machine_lacks: rpc::vsock_available(),
    });
    run_tier("namespace", tests, common::detect().err(), false);
}
