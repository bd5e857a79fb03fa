"""The in-process test modules that mostly wait (deadlines, hedges, pauses, servers' answers), run by `make test` in
a pytest process of their own beside the others (marker `waits`): their wall time overlaps the CPU-bound ones'.
Picked from a clean-clone run's junit (2026-12-07): at least 5 s of wall time, CPU (`cpu_s`) under a third of it;
together 423 s of wall time and 36 s of CPU there."""

WAIT_BOUND = frozenset({
    "test_failover", "test_socket_transport", "test_cancel_grpc", "test_socket_reading", "test_transport",
    "test_controller_drain", "test_controller", "test_transport_deadlines", "test_controller_long_changes",
    "test_controller_undropped", "test_stream_reader_death", "test_controller_loads", "test_controller_unreadable",
    "test_controller_tasks", "test_rolling_weights", "test_socket_close", "test_frame_listener",
    "test_shard_drop_memory", "test_openai_prompt_lists", "test_controller_sequences", "test_runner_request_faults",
    "test_proxy_body_cap", "test_expert_demand", "test_shard_load_memory", "test_controller_restart",
    "test_direct_connections",
})
