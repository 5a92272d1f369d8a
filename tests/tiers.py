"""Which tier each test is in: the one table, applied as markers by conftest.py.

A test named nowhere here is in the fast tier (`make test-fast`): unit tests, config
composition and tiny jobs in this process, most of them sharing conftest's session jobs.
The other tiers, each a pytest marker registered in pyproject.toml:

- integration: jobs as `python -m pipeline` subprocesses, sweeps, reloads in fresh
  processes, compilers that take tens of seconds (AOTInductor, TensorRT-RTX, int8 rounds);
- system: services beyond this package (SLURM, Ray, PostgreSQL, Chromium, model serving);
  they need `make install-all` and Debian's packages, and skip, saying why, without them;
- slow: end-to-end runs of full-size models (ResNet-18 and up);
- gpu: needs a CUDA GPU (`make test-gpu` runs only these).

Keys are paths under tests/, or `path::test_function` for every parametrization of one
test. tests/test_tiers.py checks that each key names a test that exists and that no test
file marks a tier itself.
"""

from __future__ import annotations

from pathlib import Path

TIERS: dict[str, tuple[str, ...]] = {
    "integration": (
        # In-process jobs of 5 s or more each (--durations, idle, 2026-12-03): out of the fast tier,
        # which took 353 s with them and must stay under 3 minutes on this 2-core machine.
        "test_security_load.py::test_onnx_external_data_outside_the_folder_is_never_opened",
        "test_dynamic_shapes.py::test_invalid_specs_fail_in_one_line_before_building",
        "pipeline/test_runner.py::test_bad_input_fails_cleanly",
        "test_quantization.py::test_the_job_resolves_its_quantization_once_and_config_yaml_shows_it",
        "pipeline/test_bad_input.py::test_all_zero_output_is_validated_as_equal_with_a_warning",
        "stages/test_partition.py::test_custom_op_stays_in_pytorch_between_two_engines",
        "test_security_load.py::test_a_shape_expression_never_runs",
        "test_security.py::test_a_pickle_in_a_program_is_refused_and_never_runs",
        "pipeline/test_runner.py::test_corrupt_cache_entry_is_rebuilt",
        "pipeline/test_runner.py::test_session_settings_are_applied_at_load_not_keyed",
        "pipeline/test_runner.py::test_targets_that_lower_alike_share_the_lowered_program",
        "pipeline/test_runner.py::test_eager_and_the_engine_get_one_thread_budget",
        "pipeline/test_cache_cli.py::test_list_counts_entries_per_stage",
        "pipeline/test_tracking.py::test_engines_are_uploaded_once_per_build",
        "test_security_load.py::test_devices_and_fifos_in_build_fail_at_once",
        "pipeline/test_settings_walk.py::test_a_wrong_value_is_one_line_before_any_stage",
        "pipeline/test_runner.py::test_validate_cache_reuses_the_measurement",
        "pipeline/test_runner.py::test_changing_a_partition_setting_keeps_export_and_lower",
        "pipeline/test_runner.py::test_second_identical_run_hits_every_stage_but_validate",
        "test_security.py::test_a_planted_module_is_not_imported",
        "pipeline/test_runner.py::test_renaming_the_model_rebuilds_nothing",
        # `python -m pipeline` jobs run three at a time by a module fixture
        "pipeline/test_bad_input.py::test_bad_input_prints_one_error_line",
        "pipeline/test_bad_input.py::test_outputs_under_a_regular_file",
        "pipeline/test_bad_input.py::test_compose_errors_keep_hydras_choices",
        "pipeline/test_cli.py",
        "pipeline/test_compare.py::test_cli_compares_every_run",
        "pipeline/test_compare.py::test_cli_compares_the_latest_sweep",
        "pipeline/test_compare.py::test_cli_errors_are_one_line",
        "stages/test_truncate.py::test_onnx_segments_lose_float64_only_when_asked",
        "stages/test_truncate.py::test_tensorrt_builds_float64_segments_as_float32",
        "pipeline/test_hybrid.py::test_a_raw_transformers_model_works_from_a_cached_export_and_in_a_fresh_process",
        "pipeline/test_reliability.py",
        # issues 26 and 29: stores lost and created, signals, orphans, OOM, settings refused by real jobs
        "pipeline/test_store_loss.py",
        "pipeline/test_store_creation.py",
        "pipeline/test_signals.py",
        "pipeline/test_orphans.py",
        "pipeline/test_oom.py",
        "pipeline/test_settings_walk.py::test_a_job_refuses_it_in_one_line_with_exit_2",
        "pipeline/test_sweep.py",
        "pipeline/test_tracking.py::test_pipeline_load_of_an_mlflow_run_in_a_fresh_process",
        "test_device_path.py::test_compile_cache_builds_validates_and_reports",
        "test_device_path.py::test_compile_cache_loads_hot_in_a_fresh_process_with_empty_caches",
        "test_device_path.py::test_bad_device_settings_fail_in_one_line",
        "test_device_path.py::test_onnxruntime_io_binding_runs_and_agrees",
        # jobs of their own (dynamic shapes: accuracy and latency at every corner)
        "test_dynamic_shapes.py::test_accuracy_is_checked_at_every_corner_and_between",
        "test_dynamic_shapes.py::test_one_onnx_file_serves_every_batch",
        "test_dynamic_shapes.py::test_data_dependent_op_falls_back_between_accelerated_blocks",
        "test_dynamic_shapes.py::test_tensorrt_rtx_builds_one_profile_per_spec",
        "test_dynamic_shapes.py::test_bert_tiny_keyword_integer_inputs_at_every_corner",
        "test_dynamic_shapes.py::test_a_loaded_dynamic_program_refuses_sizes_outside_its_ranges_in_one_sentence",
        # AOTInductor compiles C++ for each build
        "test_inductor_target.py::test_whole_graph_is_one_segment_that_validates",
        "test_inductor_target.py::test_reload_in_a_fresh_process",
        "test_inductor_target.py::test_freezing_off_builds_an_unfrozen_package_that_validates",
        # int8 and fp8 builds: calibration, quantization, accuracy rounds
        "test_quantization.py::test_int8_build_runs_in_int8_and_says_so",
        "test_quantization.py::test_int8_engine_loads_and_agrees_with_fp32",
        "test_quantization.py::test_calibration_methods_give_different_ranges",
        "test_quantization.py::test_calibration_folder_is_keyed_by_content",
        "test_quantization.py::test_calibration_from_a_factory_with_entropy",
        "test_quantization.py::test_asking_int8_and_getting_none_fails",
        "test_quantization.py::test_excluding_a_layer_no_segment_has_is_one_line",
        "test_quantization.py::test_accuracy_loop_keeps_the_outlier_layer_in_fp32",
        "test_quantization.py::test_tensorrt_rtx_int8_engine_has_int8_tensors",
        "test_quantization.py::test_dynamic_int8_of_a_transformer_runs_integer_matmuls",
        "test_quantization_fp8.py::test_tensorrt_rtx_fp8_engine_has_fp8_tensors",
        "test_quantization_fp8.py::test_fp8_is_refused_by_onnxruntime_in_one_line_and_nothing_is_written",
        "test_quantization_fp8.py::test_asking_fp8_and_getting_none_fails",
        "test_quantization_modelopt.py::test_export_traces_modelopt_quantize_ops_on_the_gpu",
        "test_quantization_modelopt.py::test_torch_tensorrt_quantized_build",
        "test_quantization_pt2e.py::test_inductor_int8_runs_in_int8_and_passes_the_gate",
        "test_quantization_pt2e.py::test_inductor_int8_engine_loads_and_agrees_with_fp32",
        "test_quantization_pt2e.py::test_module_paths_in_quantize_exclude_are_checked_and_kept",
        "test_quantization_torchao.py::test_fp8_on_the_cpu_is_refused_in_one_line_before_any_stage",
        "test_security.py::test_shared_libraries_load_from_your_own_builds_or_when_trusted",
        "test_security_load.py::test_a_run_shipped_with_its_own_cache_is_not_yours",
        "test_security_load.py::test_your_own_runs_load_without_trust_in_place_and_from_mlflow",
        "test_tensorrt_target.py::test_pipeline_builds_engines_and_says_why_not_validated",
        "test_tensorrt_target.py::test_mlflow_run_carries_engines_and_not_validated",
        "test_tensorrt_target.py::test_asking_fp16_and_getting_fp32_fails",
        "test_torch_tensorrt_target.py::test_real_compile_runs_and_reloads",
        "test_torch_tensorrt_target.py::test_unavailable_target_fails_in_one_line_with_the_install_command",
        # the trained digits CNN: fp32, int8 and its payoff, on onnxruntime and inductor
        "test_task_metrics.py::test_trained_digits_cnn_is_validated_on_its_held_out_split",
        "test_task_metrics.py::test_int8_digits_within_one_point_and_its_payoff_is_recorded",
        "test_task_metrics.py::test_broken_calibration_exceeds_the_budget_in_one_line",
        "test_task_metrics.py::test_digits_on_inductor_fp32_and_int8",
        "test_task_metrics.py::test_not_faster_int8_is_flagged_and_required_speedup_fails",
        # a dynamic-batch job searched for its best batch; a static one refused the search
        "pipeline/test_throughput.py::test_a_job_searches_on_its_own_engine_and_records_the_curve",
        "pipeline/test_throughput.py::test_a_static_input_is_not_searched_and_says_why",
        # real jobs beside a process holding the GPU lease (a CUDA job waits, a CPU job does not)
        "pipeline/test_gpu_lease.py::test_a_cpu_job_takes_no_lease",
        "pipeline/test_gpu_lease.py::test_a_cuda_job_waits_for_its_gpu_then_records_it",
    ),
    "system": (
        "test_cluster.py::test_slurm_sweep_through_sbatch_matches_the_basic_launcher",
        "test_cluster.py::test_ray_sweep_on_a_local_cluster_matches_the_basic_launcher",
        "test_cluster.py::test_scancel_mid_build_is_a_failed_row_and_the_sweep_goes_on",
        "test_cluster.py::test_a_ray_worker_killed_mid_build_is_a_failed_row_and_the_sweep_goes_on",
        "test_cluster.py::test_credentials_stay_in_the_environment",
        "pipeline/test_mlflow_ui.py",
        "pipeline/test_registry.py",
    ),
    "slow": (
        "pipeline/test_bad_input.py::test_vit_b_16_random_weights_give_nonzero_logits",
        # their module fixture builds the ResNet-18 hybrid
        "pipeline/test_hybrid.py::test_reload_resnet18_hybrid_in_a_fresh_process",
        "pipeline/test_hybrid.py::test_reload_imports_the_custom_op_module",
        "pipeline/test_hybrid.py::test_reload_tiny",
        "pipeline/test_hybrid.py::test_load_an_eager_run",
        "stages/test_partition.py::test_torch_executed_ops_splits_resnet18",
        "stages/test_partition.py::test_min_block_size_larger_than_any_block",
        "stages/test_partition.py::test_min_block_size_only_changes_partition_onwards",
        "stages/test_partition.py::test_require_full_compilation_with_a_fallback_fails",
        "stages/test_partition.py::test_eager_target_accelerates_nothing",
        "test_tensorrt_target.py::test_resnet18_engines",
        "test_task_metrics.py::test_int8_of_a_trained_sentence_encoder_on_real_text",
    ),
    "gpu": (
        "test_gpu.py",
        "test_quantization_modelopt.py::test_export_traces_modelopt_quantize_ops_on_the_gpu",
    ),
}

HERE = Path(__file__).resolve().parent


def tiers_of(path: Path, function: str) -> set[str]:
    """The tiers of test `function` in the file at `path` (empty: the fast tier)."""
    rel = path.resolve().relative_to(HERE).as_posix()
    return {tier for tier, keys in TIERS.items() if rel in keys or f"{rel}::{function}" in keys}
