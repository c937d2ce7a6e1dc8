"""GAIE's model-server protocol (its docs/proposals/003): the metrics an endpoint picker scrapes from engines."""


def test_engines_export_what_gaies_model_server_protocol_reads():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from nanoserve.engine_pod.metrics import EngineMetrics

    text = generate_latest(EngineMetrics("m", block_size=32, num_blocks=100).registry).decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= samples.keys()
    info = samples["vllm:cache_config_info"].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("32", "100")
